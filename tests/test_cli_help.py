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
