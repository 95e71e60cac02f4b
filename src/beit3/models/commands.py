"""`beit3 convert`: official / Hugging Face / timm checkpoints -> our directory format, and ours -> timm."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

EXAMPLES = """examples:
  beit3 convert beit3_base_patch16_480_vqa.pth models/vqa-base-480
  beit3 convert beit3_base_patch16_224.pth models/base --task backbone
  beit3 convert beit3_base_patch16_224.pth models/nlvr2-init --task nlvr2 --init-head
  beit3 convert beit3_large_patch16_224.pth models/large-384 --task backbone --image-size 384
  beit3 convert timm-beit3-base/model.safetensors models/in1k-timm        # timm weights (vision only)
  beit3 convert hf-beit3-vqa/ models/vqa-hf                              # a Hugging Face BEiT-3 PR folder
  beit3 convert models/in1k-base in1k-timm.safetensors --to timm          # ours -> a timm file
  beit3 convert runs/giant/checkpoints/step_20000 models/giant            # a sharded training checkpoint

The output folder loads with Beit3Model.from_pretrained / Beit3For<Task>.from_pretrained and is what
model.pretrained and `beit3 evaluate --checkpoint` take. With --to timm the output is one file that
timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...)) loads; the command
prints the exact call. Formats read: docs/checkpoints.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "convert",
        help=summary("convert"),
        description="Read an official BEiT-3 checkpoint, a Hugging Face BEiT-3 folder or timm's vision-only "
        "weights, check that every tensor fits, and write config.json + model.safetensors (or, with --to timm, "
        "a timm weights file). The task is detected from the head keys unless --task is given.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path,
                        help="input .pth / .pt / .bin / .safetensors file, or a folder (ours, Hugging Face or timm)")
    parser.add_argument("output", type=Path,
                        help="output directory (created); with --to timm, the output file (.safetensors or .pth)")
    parser.add_argument("--to", default="beit3", choices=["beit3", "timm"],
                        help="output format: beit3 (our folder, default) or timm (an image classifier or vision "
                        "backbone as timm's beit3_* VisionTransformer)")
    parser.add_argument("--task", default="auto",
                        help="model to build: auto (the default: detected from the checkpoint's head keys), backbone, "
                             "or a task whose checkpoints have a head (vqav2, captioning, classification, ...)")
    parser.add_argument("--image-size", type=int, help="resample the vision position table to this image size")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: width / 64 as every release; 16 for the giant width 1408)")
    parser.add_argument("--mask-token-id", type=int,
                        help="captioning: id of <mask> in your tokenizer (default 64001, the official one)")
    parser.add_argument("--ema", action="store_true",
                        help="a training checkpoint saved with EMA: convert the averaged weights")
    parser.add_argument("--init-head", action="store_true",
                        help="start a fresh head for --task instead of requiring it in the checkpoint")
    parser.set_defaults(func=run_convert)


def _convertible() -> list[str]:
    """The catalogue's tasks whose checkpoints ``convert`` recognises by their head keys."""
    from beit3.catalogue import iter_tasks

    return [spec.name for spec in iter_tasks("finetune", having="head_keys")]


def detect_task(state: dict) -> str:
    """The task of a task-form state dict (``beit3.auto.detect_task``), ``--task`` in the advice."""
    from beit3.auto import detect_task as detect

    try:
        return detect(state)
    except ValueError as err:
        raise ValueError(str(err).replace("pass task=", "pass --task")) from None


def run_convert(args: argparse.Namespace) -> int:
    if args.task not in ("auto", "backbone", *_convertible()):
        raise ValueError(f"--task {args.task!r} is not one of: auto, backbone, {', '.join(_convertible())}")
    from beit3.training.checkpoint import is_sharded

    if args.checkpoint.is_dir() and is_sharded(args.checkpoint):
        # A sharded training checkpoint (torch.distributed.checkpoint): gathered in this one process into
        # our folder format first, then converted like any of our folders.
        import tempfile

        from beit3.io import ensure_writable_dir
        from beit3.training.checkpoint import consolidate

        if args.to == "beit3":
            ensure_writable_dir(args.output)
        with tempfile.TemporaryDirectory(prefix="beit3-consolidate-") as staged:
            consolidate(args.checkpoint, staged, ema=args.ema)
            print(f"{args.checkpoint}: sharded checkpoint gathered ({'EMA' if args.ema else 'model'} weights)",
                  file=sys.stderr)
            args.checkpoint = Path(staged)
            return _convert(args)
    return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from beit3.catalogue import get_task
    from beit3.io import ensure_writable_dir, ensure_writable_file
    from beit3.models import Beit3Model, count_parameters
    from beit3.models.convert import CheckpointError, load_pretrained, read_state_dict, resolve_checkpoint, to_task_form

    if not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint file not found: {args.checkpoint}; pass a .pth of the BEiT-3 release "
                                "(see docs/checkpoints.md), a timm .safetensors/.pth file, or a model folder")
    if args.to == "timm":
        if args.output.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise ValueError(f"with --to timm the output is a file: {args.output} should end in .safetensors or .pth")
        ensure_writable_file(args.output)
    else:
        ensure_writable_dir(args.output)  # a read-only or full destination fails now, not after the conversion
    source, _ = resolve_checkpoint(args.checkpoint)
    if source.is_dir():  # one of our folders
        import json

        architecture = json.loads((source / "config.json").read_text()).get("architecture", "Beit3Model")
        state, layout, task = None, "beit3", _task_of_architecture(architecture)
    else:
        state, layout = to_task_form(read_state_dict(source))
        task = None
    if args.task != "auto":
        task = args.task
    elif task is None:
        task = detect_task(state)
    cls = Beit3Model if task == "backbone" else get_task(task).model_class
    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_heads", args.num_heads)) if v}
    if args.mask_token_id is not None and "mask_token_id" in inspect.signature(cls.__init__).parameters:
        overrides["mask_token_id"] = args.mask_token_id
    model = load_pretrained(cls, args.checkpoint, init_head=args.init_head, **overrides)
    c = model.config
    notes = []
    if layout == "timm" and args.to != "timm":
        notes.append("timm files hold the vision side only: the text embedding, text experts and text positions keep "
                     f"their fresh initialisation (defaults: vocabulary {c.vocab_size}, {c.max_text_positions} text "
                     "positions); fine-tune before using the model on text")
    if getattr(model, "mask_token_id", 0) is None:
        notes.append(f"the vocabulary has {c.vocab_size} rows, not the official 64010, so the <mask> id that captioning "
                     "decodes with is unknown: run the conversion again with --mask-token-id N (N = your tokenizer's "
                     "<mask> id), or pass mask_token_id= to generate()")

    if args.to == "timm":
        from beit3.models.timm_format import save_timm_checkpoint, timm_load_snippet

        try:
            name, kwargs = save_timm_checkpoint(model, args.output)
        except CheckpointError as err:
            raise CheckpointError(f"{args.checkpoint}: {err}") from None
        print(f"{args.checkpoint} ({layout} layout) -> {args.output}: timm {name}, {c.num_layers} layers x "
              f"{c.hidden_size}, {c.image_size}px (vision side only). Load it with:\n  import timm\n  "
              + timm_load_snippet(args.output, name, kwargs))
    else:
        model.save_pretrained(args.output)
        print(f"{args.checkpoint} ({layout} layout) -> {args.output}: {cls.__name__}, "
              f"{c.num_layers} layers x {c.hidden_size}, {c.image_size}px, vocabulary {c.vocab_size}, "
              f"{count_parameters(model):,} parameters")
    for note in notes:
        print(f"beit3 convert: note: {note}", file=sys.stderr)
    return 0


def _task_of_architecture(architecture: str) -> str:
    """The catalogue task whose model class is ``architecture`` (``backbone`` for Beit3Model)."""
    from beit3.catalogue import iter_tasks

    for spec in iter_tasks("finetune", having="head_keys"):
        if spec.model_class.__name__ == architecture:
            return spec.name
    return "backbone"
