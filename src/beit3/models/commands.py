"""`beit3 convert`: official / timm checkpoint files -> our directory format."""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path

EXAMPLES = """examples:
  beit3 convert beit3_base_patch16_480_vqa.pth models/vqa-base-480
  beit3 convert beit3_base_patch16_224.pth models/base --task backbone
  beit3 convert beit3_base_patch16_224.pth models/nlvr2-init --task nlvr2 --init-head
  beit3 convert beit3_large_patch16_224.pth models/large-384 --task backbone --image-size 384

The output folder loads with Beit3Model.from_pretrained / Beit3For<Task>.from_pretrained and is what
model.pretrained and `beit3 evaluate --checkpoint` take. Formats read: docs/models.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "convert",
        help=summary("convert"),
        description="Read an official BEiT-3 checkpoint (or timm's vision-only weights), check that every "
        "tensor fits, and write config.json + model.safetensors. The task is detected from the head keys "
        "unless --task is given.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="input .pth / .pt / .bin / .safetensors file")
    parser.add_argument("output", type=Path, help="output directory (created)")
    parser.add_argument("--task", default="auto", choices=["auto", "backbone", *_convertible()],
                        help="model to build (default: auto, detected from the checkpoint's head keys)")
    parser.add_argument("--image-size", type=int, help="resample the vision position table to this image size")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: width / 64, as every release)")
    parser.add_argument("--mask-token-id", type=int,
                        help="captioning: id of <mask> in your tokenizer (default 64001, the official one)")
    parser.add_argument("--init-head", action="store_true",
                        help="start a fresh head for --task instead of requiring it in the checkpoint")
    parser.set_defaults(func=run_convert)


def _convertible() -> list[str]:
    """The catalogue's tasks whose checkpoints ``convert`` recognises by their head keys."""
    from beit3.catalogue import iter_tasks

    return [spec.name for spec in iter_tasks("finetune", having="head_keys")]


def detect_task(state: dict) -> str:
    """Which task a (task-form) state dict was trained for: the task whose declared head keys
    are all present, the one with the most keys first (NLVR2's head sits beside a pooler, for
    instance); ``backbone`` when none fits."""
    from beit3.catalogue import iter_tasks

    fitting = [spec for spec in iter_tasks("finetune", having="head_keys") if all(k in state for k in spec.head_keys)]
    if not fitting:
        return "backbone"
    most = max(len(spec.head_keys) for spec in fitting)
    best = [spec for spec in fitting if len(spec.head_keys) == most]
    if len(best) > 1:
        raise ValueError(f"the checkpoint's head keys fit the tasks {', '.join(s.name for s in best)}; pass --task")
    return best[0].name


def run_convert(args: argparse.Namespace) -> int:
    from beit3.catalogue import get_task
    from beit3.models import Beit3Model, count_parameters
    from beit3.models.convert import read_state_dict, to_task_form

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {args.checkpoint}; pass a .pth of the BEiT-3 release "
                                "(see docs/models.md) or a timm .safetensors file")
    state, layout = to_task_form(read_state_dict(args.checkpoint))
    task = detect_task(state) if args.task == "auto" else args.task
    cls = Beit3Model if task == "backbone" else get_task(task).model_class
    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_heads", args.num_heads)) if v}
    if args.mask_token_id is not None and "mask_token_id" in inspect.signature(cls.__init__).parameters:
        overrides["mask_token_id"] = args.mask_token_id
    model = cls.from_pretrained(args.checkpoint, init_head=args.init_head, **overrides)
    model.save_pretrained(args.output)
    c = model.config
    print(f"{args.checkpoint} ({layout} layout) -> {args.output}: {cls.__name__}, "
          f"{c.num_layers} layers x {c.hidden_size}, {c.image_size}px, vocabulary {c.vocab_size}, "
          f"{count_parameters(model):,} parameters")
    return 0
