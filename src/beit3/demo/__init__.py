"""`beit3 demo`: the default job, a complete BEiT-3 run on the built-in synthetic world.

Every stage runs the same command a user would type (``beit3 data synthetic``, ``beit3 tokenizer
train``, ``beit3 visual-tokenizer train``, ``beit3 pretrain``, ``beit3 finetune``), in this process
(the fine-tunings two at a time, each in its own process, on a machine with two cores or more), so
the demo exercises the real code paths. See :mod:`beit3.demo.pipeline` for the stages and
:mod:`beit3.demo.report` for the pictures.
"""
from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  # the whole run (about 13 minutes on 2 CPU cores): data, tokenizers, pretraining, probes, 10 fine-tunings
  beit3 demo
  # a smoke run of every stage in about 2 minutes
  beit3 demo --quick --out runs/demo_quick
  # keep going after an interruption: finished stages are skipped
  beit3 demo --out runs/demo
  # three fine-tuning seeds per task and start: mean gains and their spread (reuses a finished demo's runs)
  beit3 demo --seeds 3 --out runs/demo
  # on a machine shared with other jobs: one CPU thread per run is many times faster there
  beit3 demo --threads 1

Writes OUT/report/: results.md and results.json (pretrained vs scratch per task), loss_curves.png,
captioning.png and vqa.png (predictions drawn under the images) and retrieval.png (a grid of
text queries and their top images).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "demo",
        help=summary("demo"),
        description="Run BEiT-3 end to end on the built-in synthetic world, with no download: generate "
                    "the data, train the text tokenizer and the VQ-KD visual tokenizer, pretrain a tiny "
                    "BEiT-3 by masked data modeling, fine-tune and evaluate it on image classification, "
                    "VQA, NLVR2, image-text retrieval and captioning, do the same from scratch, and write "
                    "a report comparing the two.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="folder for data, runs and report (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smaller world and short schedules: a smoke run")
    parser.add_argument("--fresh", action="store_true", help="redo every stage even if its output exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="fine-tune every task from each start with this many seeds (--seed, --seed + 1, ...) on "
                             "the same world and pretrained model, and report each gain's mean and spread "
                             "(default: %(default)s; 3 takes about three times the fine-tuning time)")
    parser.add_argument("--threads", type=int, help="CPU threads per training run (train.threads; default: PyTorch's, "
                        "one per core; 1 is much faster on a machine shared with other jobs)")
    parser.add_argument("--jobs", type=int, help="fine-tunings run at once, each its own process (default: 2 on a "
                        "machine with 2 cores or more; 1: one by one in this process)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from beit3.demo.pipeline import DemoPlan, run_demo

    plan = DemoPlan.quick() if args.quick else DemoPlan.full()
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    run_demo(args.out, plan, seed=args.seed, fresh=args.fresh, threads=args.threads, seeds=args.seeds, jobs=args.jobs)
    return 0
