"""``beit3 visual-tokenizer``: train a VQ-KD tokenizer against a teacher, and report codebook usage.

(``beit3 tokenizer`` is the text tokenizer's command; the visual one has its own name.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# torch, torchvision and the tokenizer code are imported when a command runs, not to parse it.

TRAIN_EXAMPLES = """\
examples:
  # seconds on CPU: the HOG teacher needs no weights (the synthetic world's shards)
  beit3 visual-tokenizer train --images 'data/synthetic/pretrain/images/*.tar' --preset tiny \\
      --codebook-size 256 --steps 300 --batch-size 64 --lr 1e-3 --out data/synthetic/vqkd
  # BEiT v2's recipe: a CLIP ViT-B/16 teacher from a local timm checkpoint, on one GPU
  beit3 visual-tokenizer train --images /data/imagenet/train --preset base \\
      --teacher timm:vit_base_patch16_clip_224.openai --teacher-checkpoint clip_b16.safetensors \\
      --steps 250000 --batch-size 512 --warmup-steps 10000 --out vqkd_base

Writes vqkd_config.json, vqkd.safetensors and codebook_usage.json to --out; the pretraining recipes
name that folder in task.options.visual_tokenizer.
"""

USAGE_EXAMPLES = """\
examples:
  beit3 visual-tokenizer usage --tokenizer data/synthetic/vqkd --images 'data/synthetic/pretrain/images/*.tar'
  beit3 visual-tokenizer usage --tokenizer vqkd_base.pth --images /data/imagenet/val --limit 10000 --device cuda

Prints JSON: used_codes, codebook_size, usage (their share), perplexity of the code distribution
and num_patches. A healthy tokenizer uses most of its codebook.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "visual-tokenizer", help=summary("visual-tokenizer"),
        description="VQ-KD (BEiT v2) visual tokenizer for masked image modeling targets. See docs/pretraining.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  beit3 visual-tokenizer train --images 'world/pretrain/images/*.tar' --preset tiny --out vqkd\n"
               "  beit3 visual-tokenizer train --images imagenet/train --teacher timm:vit_base_patch16_clip_224.openai \\\n"
               "      --teacher-checkpoint clip_b16.safetensors --preset base --steps 250000 --batch-size 512 --out vqkd\n"
               "  beit3 visual-tokenizer usage --tokenizer vqkd --images 'world/pretrain/images/*.tar'\n",
    )
    sub = parser.add_subparsers(dest="action", metavar="<action>")
    train = sub.add_parser(
        "train", help="train a tokenizer against a frozen teacher",
        description="Train a VQ-KD tokenizer: a ViT encoder's patch features are quantised to the nearest "
                    "codebook entry, from which a decoder must reconstruct a frozen teacher's features (HOG, "
                    "or a timm model such as CLIP); unused codes are restarted. The codes become the masked "
                    "image modeling targets of pretraining.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--images", required=True, help="tar shards (glob ending in .tar) or an image folder")
    train.add_argument("--out", required=True, help="output directory (vqkd_config.json + vqkd.safetensors)")
    train.add_argument("--preset", choices=("tiny", "base"), default="tiny",
                       help="tokenizer size: tiny (CPU-sized) or base (BEiT v2's) (default: %(default)s)")
    train.add_argument("--image-size", type=int, help="override the preset's image size")
    train.add_argument("--patch-size", type=int, help="override the preset's patch size")
    train.add_argument("--codebook-size", type=int, help="override the preset's number of codes")
    train.add_argument("--teacher", default="hog", help="'hog' (built in, no weights) or 'timm:<model name>'")
    train.add_argument("--teacher-checkpoint", help="local weights file of a timm teacher")
    train.add_argument("--teacher-size", type=int, help="input side of a timm teacher (default: image size)")
    train.add_argument("--steps", type=int, default=500, help="optimiser steps (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, cosine decay (default: %(default)s)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="seed of the model, crops and sampling (default: %(default)s)")
    train.add_argument("--device", default="auto",
                       help="where to train: auto (the GPU when there is one), cpu, cuda, ... (default: auto)")
    train.set_defaults(func=_run_train)
    usage = sub.add_parser(
        "usage", help="codebook usage of a tokenizer over images",
        description="Tokenize images (resized, no augmentation) and report how many codes of the codebook "
                    "they use and the perplexity of the code distribution: the check for codebook collapse.",
        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    usage.add_argument("--tokenizer", required=True, help="a VQ-KD directory or a BEiT v2 .pth")
    usage.add_argument("--images", required=True, help="tar shards (glob ending in .tar) or an image folder")
    usage.add_argument("--limit", type=int, default=5000, help="at most this many images (default: %(default)s)")
    usage.add_argument("--device", default="auto",
                       help="where to run: auto (the GPU when there is one), cpu, cuda, ... (default: auto)")
    usage.set_defaults(func=_run_usage)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _refs(pattern: str):
    from beit3.pretraining.data import collect_refs
    from beit3.pretraining.vqkd_training import image_source

    source = image_source(pattern)
    return source, collect_refs(source)


def _run_train(args: argparse.Namespace) -> int:
    from beit3.io import atomic_write_text, ensure_writable_dir
    from beit3.pipelines import resolve_device
    from beit3.pretraining.teachers import HOGTeacher
    from beit3.pretraining.vqkd import VQKDConfig
    from beit3.pretraining.vqkd_training import build_teacher, codebook_usage, train_visual_tokenizer
    from beit3.training.distributed import configure_threads

    # A read-only or full --out fails now, in one line, not after the training steps.
    ensure_writable_dir(args.out, "output folder (--out)")
    configure_threads(None)  # half the CPUs (or OMP_NUM_THREADS): see docs/training.md, "CPU threads"
    overrides = {k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size),
                                   ("codebook_size", args.codebook_size)) if v is not None}
    if args.teacher == "hog":
        overrides["teacher_dim"] = HOGTeacher(args.patch_size or (8 if args.preset == "tiny" else 16)).dim
    config = (VQKDConfig.tiny if args.preset == "tiny" else VQKDConfig.base)(**overrides)
    teacher = build_teacher(args.teacher, config, args.teacher_checkpoint, args.teacher_size)
    if args.teacher != "hog":
        config = VQKDConfig(**{**config.to_dict(), "teacher_dim": teacher.dim})
    source, refs = _refs(args.images)
    model = train_visual_tokenizer(refs, source.load, config, teacher, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, device=resolve_device(args.device),
                                   log=lambda line: print(line, file=sys.stderr))
    model.cpu().save_pretrained(args.out)
    report = codebook_usage(model, refs[:5000], source.load, device="cpu")
    atomic_write_text(Path(args.out, "codebook_usage.json"), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def _run_usage(args: argparse.Namespace) -> int:
    if not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"no visual tokenizer at {args.tokenizer}: pass a folder written by "
                                "`beit3 visual-tokenizer train` or a BEiT v2 tokenizer .pth")
    from beit3.pipelines import resolve_device
    from beit3.pretraining.vqkd import VQKD
    from beit3.pretraining.vqkd_training import codebook_usage

    model = VQKD.from_pretrained(args.tokenizer)
    source, refs = _refs(args.images)
    print(json.dumps(codebook_usage(model, refs[: args.limit], source.load, device=resolve_device(args.device))))
    return 0
