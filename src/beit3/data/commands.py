"""``beit3 data``: generate the synthetic world and build task indexes from official annotation files."""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

from beit3.data.builders import BUILDERS
from beit3.data.synthetic import WORLD_SIZES, generate
from beit3.io import ensure_writable_dir

DATA_EXAMPLES = """examples:
  beit3 data synthetic --out data/synthetic                              # tiny data for every task, seconds
  beit3 data build vqav2 --root /data/coco --out /data/index             # index the official VQAv2 files
  beit3 finetune --recipe configs/vqav2_base_480.yaml data.root=/data/index

Index formats and the layout each builder reads: docs/data.md.
"""

SYNTHETIC_EXAMPLES = """examples:
  beit3 data synthetic --out data/synthetic --size small      # a few seconds, for smoke tests
  beit3 data synthetic --out data/synthetic --size medium --seed 1 --image-size 96

Writes coco/ (dataset_coco.json + vqa/), flickr30k/, nlvr2/, imagenet/, detection/ (COCO JSON),
pretrain/ (tar shards and texts.txt) and, unless --no-index, the task indexes in OUT/index/.
"""

BUILD_EXAMPLES = """examples:
  beit3 data build coco_retrieval  --root /data/coco --out /data/index
  beit3 data build coco_captioning --root /data/coco --out /data/index
  beit3 data build flickr30k       --root /data/flickr30k --out /data/index
  beit3 data build vqav2 --root /data/coco --out /data/index --seed 0 --rest-val-images 1000
  beit3 data build nlvr2 --root /data/nlvr2 --annotations /data/nlvr/nlvr2/data --out /data/index
  beit3 data build imagenet --root /data/imagenet --out /data/index --verify-images

Prints rows per index file and every problem found (missing images, empty captions), and progress
on stderr (a bar on a terminal, a line every 30 s in a log). An index with no usable row is never
written; --strict turns any problem into an error. The files of a build replace the old ones all
together at the end: a failed build (a full disk) leaves the previous index as it was.
"""


def _synthetic(args: argparse.Namespace) -> int:
    ensure_writable_dir(args.out, what="--out folder")  # before generating anything
    start = time.perf_counter()
    reports = generate(args.out, size=args.size, seed=args.seed, image_size=args.image_size,
                       build_indexes=not args.no_index)
    print(f"synthetic world ({args.size}, seed {args.seed}, {args.image_size}px) written to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    for report in reports:
        print(report.summary())
    return 0


def _build(args: argparse.Namespace) -> int:
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root} is not a folder: point it at the {args.task} dataset in its "
                                "official layout (see docs/data.md)")
    builder = BUILDERS[args.task]
    out = args.out or args.root
    accepted = set(inspect.signature(builder).parameters)
    options = {"strict": args.strict, "verify_images": args.verify_images}
    given = {name: getattr(args, name) for name in ("seed", "rest_val_images", "min_answer_count", "legacy")
             if getattr(args, name) not in (None, False)}
    if args.annotations:
        # Builders reading one file call it ``annotation``, those reading a folder ``annotations``.
        given["annotation" if "annotation" in accepted else "annotations"] = args.annotations
    for name, value in given.items():
        if name not in accepted:
            flag = "--annotations" if name.startswith("annotation") else "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to {args.task}")
        options[name] = value
    # A read-only or unwritable destination fails here, in one line, before minutes of reading.
    ensure_writable_dir(out, what="--out folder" if args.out else "--root folder (the default --out)")
    try:
        report = builder(args.root, out, **options)
    except FileNotFoundError as err:
        if err.filename is None:  # already a sentence of ours
            raise
        raise FileNotFoundError(f"{err.filename} not found: {args.task} reads the official layout under --root "
                                "(see docs/data.md); pass --annotations if the annotation files live elsewhere") from err
    print(report.summary())
    return 0


SHARDS_EXAMPLES = """examples:
  beit3 data shards '/data/laion/{00000..01023}.tar'     # brace ranges, as webdataset writes them
  beit3 data shards /data/laion/*.tar /data/cc3m/*.tar

Counts the samples of each local tar shard once and writes them to beit3_shards.json in the
shards' folder, so that a pretraining run (every rank) starts by reading one small file instead
of every tar header. Runs also write it on their first start when the folder is writable; a shard
that changed (size or time) is counted again. Streamed shards (URLs, pipe:, .tar.gz) have no count.
"""


def _shards(args: argparse.Namespace) -> int:
    import warnings

    from beit3.data.streams import INDEX_FILE, expand_paths, is_streamed, write_shard_index

    paths = expand_paths(args.shards)
    if not paths:
        raise FileNotFoundError(f"no shard matches {' '.join(args.shards)}")
    streamed = [path for path in paths if is_streamed(path)]
    missing = [path for path in paths if not is_streamed(path) and not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    folders = sorted({str(Path(path).resolve().parent) for path in paths if not is_streamed(path)})
    for folder in folders:
        ensure_writable_dir(folder, what="shard folder (where beit3_shards.json goes)")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = write_shard_index(paths)
    for warning in caught:
        print(f"warning: {warning.message}")
    print(f"{len(counts)} shards, {sum(counts.values())} samples, counted in {time.perf_counter() - start:.1f}s; "
          f"index written to {', '.join(str(Path(f) / INDEX_FILE) for f in folders)}")
    if streamed:
        print(f"{len(streamed)} streamed shards (URLs, pipe:, compressed tars) are not counted: reading them is the only way")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``beit3 data synthetic``, ``beit3 data build`` and ``beit3 data shards``."""
    from beit3.cli import summary

    data = subparsers.add_parser("data", help=summary("data"),
                                 description="Prepare data: generate the synthetic world or build task indexes.",
                                 epilog=DATA_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = data.add_subparsers(dest="action", metavar="<action>")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    synthetic = actions.add_parser(
        "synthetic", help="write the seeded synthetic world in every supported format",
        description="Write a small seeded world of coloured shapes in the official format of every dataset "
                    "(COCO, VQAv2, Flickr30k, NLVR2, ImageNet, detection, pretraining shards) with captions, "
                    "questions and statements that describe the images, for smoke tests and tiny recipes.",
        epilog=SYNTHETIC_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic.add_argument("--out", required=True, help="folder to write (created if missing)")
    synthetic.add_argument("--size", choices=sorted(WORLD_SIZES), default="small", help="how much data (default: small)")
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default: 0)")
    synthetic.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    synthetic.add_argument("--no-index", action="store_true", help="write raw formats only, skip the index builders")
    synthetic.set_defaults(func=_synthetic)

    build = actions.add_parser(
        "build", help="build a task index from the official annotation files",
        description="Read a dataset in its official layout and write the JSON-lines index files (and "
                    "answer2label.txt for VQAv2) that fine-tuning reads from data.root.",
        epilog=BUILD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("task", choices=sorted(BUILDERS), help="which dataset format to read")
    build.add_argument("--root", required=True, help="dataset folder in the official layout (see docs/data.md)")
    build.add_argument("--out", help="folder for the index files (default: --root)")
    build.add_argument("--annotations", help="annotation file or folder when not in the default place under --root")
    build.add_argument("--strict", action="store_true", help="fail on any problem instead of skipping and reporting")
    build.add_argument("--verify-images", action="store_true", help="decode every image in full (catches truncated and corrupt files), "
                       "not only check it exists; slower")
    build.add_argument("--seed", type=int, help="vqav2: seed of the rest_val split (default: 0)")
    build.add_argument("--rest-val-images", type=int, help="vqav2: val images held out as rest_val (default: 1000)")
    build.add_argument("--min-answer-count", type=int, help="vqav2: keep answers seen this often (default: 9)")
    build.add_argument("--legacy", action="store_true",
                       help="vqav2: reproduce the released normalisation bugs (byte-identical answer2label.txt)")
    build.set_defaults(func=_build)

    shards = actions.add_parser(
        "shards", help="count the samples of tar shards once, for fast pretraining start-up",
        description="Write beit3_shards.json (samples per shard) beside local WebDataset tar shards.",
        epilog=SHARDS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    shards.add_argument("shards", nargs="+", help="tar shards: paths, globs or brace ranges ({000..099})")
    shards.set_defaults(func=_shards)
