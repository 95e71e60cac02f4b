"""The `beit3` command line: one entry point, one sub-command module per area.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on each parser. Modules are imported only here, so importing
``beit3.models`` never pulls in training or data code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "beit3.models.commands",
    "beit3.data.commands",
    "beit3.demo",
    "beit3.processing.commands",
    "beit3.training.commands",
    "beit3.pretraining.commands",
    "beit3.tasks.predict",
    "beit3.tasks.search",
    "beit3.tasks.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beit3",
        description="BEiT-3: pretraining, fine-tuning, evaluation and inference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'beit3 <command> --help' for the options and examples of each command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Bad input is reported in one line that says what to fix, not as a traceback.
        print(f"beit3 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
