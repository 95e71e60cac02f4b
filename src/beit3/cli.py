"""The `beit3` command line: one entry point, one sub-command module per area.

Each module named in ``COMMANDS`` exposes ``register(subparsers)``, which adds its commands and
sets ``func`` on each parser. A module is imported only when its command runs (``beit3 --help``
imports none), so importing ``beit3.models`` never pulls in training or data code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("beit3.demo", "the default job: synthetic data -> tokenizers -> pretraining -> 5 tasks, pretrained vs scratch"),
    "convert": ("beit3.models.commands", "convert an official unilm .pth (or timm) checkpoint into a beit3 model directory"),
    "data": ("beit3.data.commands", "synthetic world and dataset index builders"),
    "tokenizer": ("beit3.processing.commands", "train or extend a SentencePiece tokenizer"),
    "pretrain": ("beit3.training.commands", "Pretrain a BEiT-3 model with masked data modeling"),
    "finetune": ("beit3.training.commands", "Fine-tune a BEiT-3 model on a downstream task"),
    "visual-tokenizer": ("beit3.pretraining.commands", "train a VQ-KD visual tokenizer and report its codebook usage"),
    "predict": ("beit3.tasks.predict", "run a fine-tuned model on your images (a sub-command per task: caption, vqa, ...)"),
    "search": ("beit3.tasks.search_commands", "index folders of images with a retrieval model and search them by text or image"),
    "export": ("beit3.export", "export a model folder to ONNX / torch.export graphs that onnxruntime can run"),
    "evaluate": ("beit3.tasks.commands", "score a fine-tuned checkpoint on a split (JSON + table)"),
    "probe": ("beit3.tasks.probe", "linear probe on a frozen backbone: what pretraining learned, without fine-tuning"),
    "serve": ("beit3.serve", "serve models and an image index over HTTP: JSON API, batching, a web page"),
}
"""Each command: the module whose ``register(subparsers)`` adds it, and its one-line summary.
The overview (``beit3 --help``) is built from this table alone, without importing any module."""


def summary(command: str) -> str:
    """The one-line help of a command (the modules use it, so it is written once, here)."""
    return COMMANDS[command][1]


def _root() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="beit3",
        description="BEiT-3: pretraining, fine-tuning, evaluation and inference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'beit3 <command> --help' for the options and examples of each command.",
    )
    return parser, parser.add_subparsers(dest="command", metavar="<command>")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or only the commands of ``command``'s module (what ``main`` runs)."""
    parser, subparsers = _root()
    modules = [COMMANDS[command][0]] if command in COMMANDS else list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def overview_parser() -> argparse.ArgumentParser:
    """The root parser with every command named and summarised, nothing imported."""
    parser, subparsers = _root()
    for name, (_, text) in COMMANDS.items():
        subparsers.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    # Only the named command's module is imported; without one, the overview needs none.
    parser = build_parser(command) if command in COMMANDS else overview_parser()
    args = parser.parse_args(words)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError) as err:
        # Bad input is reported in one line that says what to fix, not as a traceback.
        print(f"beit3 {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # Missing inputs, read-only or full destinations: the path and the plain reason, one line.
        from beit3.io import describe_os_error

        print(f"beit3 {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
