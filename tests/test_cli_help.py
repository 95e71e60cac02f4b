"""Every `beit3` command explains itself: a description, and examples that parse.

The test walks the argparse tree ``beit3.cli.build_parser()`` builds, so a command added later is
checked without being listed here.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex

import pytest

from beit3.cli import build_parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser below the root, by its command line ("data build", "predict vqa", ...)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[" ".join(path + (name,))] = sub
                    walk(sub, path + (name,))

    walk(build_parser(), ())
    return found


PARSERS = command_parsers()


def example_commands(epilog: str) -> list[list[str]]:
    """The `beit3 ...` command lines of an epilog's examples, continuation lines joined, comments
    dropped; `torchrun ... -m beit3 ...` counts from `beit3` on."""
    if "examples:" not in epilog:
        return []
    text = epilog.split("examples:", 1)[1].replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if not line.strip().startswith(("beit3 ", "torchrun ")):
            continue  # prose and comment lines
        words = shlex.split(line, comments=True)
        if "beit3" in words and (words[0] == "beit3" or words[words.index("beit3") - 1] == "-m"):
            commands.append(words[words.index("beit3") + 1:])
    return commands


def test_the_walk_finds_the_commands():
    assert {"convert", "data", "data build", "finetune", "evaluate", "visual-tokenizer train"} <= set(PARSERS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_has_a_description_and_examples(command):
    parser = PARSERS[command]
    assert parser.description and parser.description.strip(), f"beit3 {command}: no description"
    assert parser.epilog and "examples:" in parser.epilog, f"beit3 {command}: no 'examples:' epilog"
    # the raw formatter keeps one example a line; the default one would run them together
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter), f"beit3 {command}"
    help_text = parser.format_help()
    assert parser.description.split()[0] in help_text and "examples:" in help_text


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_examples_are_valid_command_lines(command):
    """Each example parses with the real parser: names existing commands and options."""
    examples = example_commands(PARSERS[command].epilog or "")
    assert examples, f"beit3 {command}: its examples show no `beit3 ...` command line"
    parser = build_parser()
    for words in examples:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"example `beit3 {shlex.join(words)}` does not parse: {errors.getvalue().strip()}")


def test_overview_imports_no_command_module_nor_torch():
    """`beit3 --help` is built from the command table alone (it took ~5.5 s importing everything)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from beit3.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.endswith('.commands') or m == 'beit3.catalogue')\n"
            "print(repr(heavy)); print(out.getvalue())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, _, text = result.stdout.partition("\n")
    assert heavy == "[]"
    from beit3.cli import COMMANDS

    assert all(name in text for name in COMMANDS)


def test_every_command_of_the_table_is_registered_by_its_module_with_its_summary():
    from beit3.cli import COMMANDS, build_parser, summary

    for name in COMMANDS:
        parser = build_parser(name)
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert name in action.choices, f"{COMMANDS[name][0]} does not register '{name}'"
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        assert helps[name] == summary(name)
    assert set(command_parsers()) >= set(COMMANDS)


LIGHT_USAGE_ERRORS = [["convert"], ["finetune", "--bogus"], ["pretrain", "--bogus"], ["evaluate"],
                      ["tokenizer", "train"], ["visual-tokenizer", "train"], ["data", "build"], ["demo", "--bogus"], ["search", "index"],
                      ["search", "query", "--index", "x"], ["export"], ["serve", "--bogus"]]


@pytest.mark.parametrize("argv", LIGHT_USAGE_ERRORS, ids=" ".join)
def test_a_usage_error_answers_without_loading_torch(argv):
    """A mistyped command line is answered by argparse alone: no torch, no models, no data code."""
    import subprocess
    import sys

    code = ("import sys\nfrom beit3.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "error:" in done.stderr, done.stderr
    assert done.stdout.strip() == "False", f"beit3 {' '.join(argv)} imported torch to report a usage error"
