"""``beit3 pretrain`` and ``beit3 finetune``: load a recipe, apply overrides, run the engine."""
from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from pathlib import Path

from typing import Literal

TaskKind = Literal["pretrain", "finetune"]
# The engine (torch, the models, the data) is imported when a run starts, not to parse arguments,
# so `beit3 finetune` with a wrong option answers at once.

_EPILOG = """\
Any recipe key can be overridden as section.key=value (values are YAML):
  optim.lr=2e-5  data.batch_size=256  train.precision=bf16  parallel.strategy=fsdp
  task.options.label_smoothing=0.1  schedule.max_steps=100  train.resume=auto

examples:
  # one process (CPU or one GPU)
  beit3 {cmd} --recipe configs/{recipe} train.output_dir=runs/x
  # 8 GPUs on one node; the recipe's batch is global, so accumulation fills any gap
  torchrun --nproc_per_node 8 -m beit3 {cmd} --recipe configs/{recipe}
  # 2 nodes x 8 GPUs with FSDP2 and activation checkpointing (run on every node)
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      -m beit3 {cmd} --recipe configs/{recipe} parallel.strategy=fsdp parallel.activation_checkpointing=true
  # continue a killed or preempted run from its newest intact checkpoint
  beit3 {cmd} --recipe configs/{recipe} --resume auto
  # a fresh run into a folder holding an older run: delete that run's files first
  beit3 {cmd} --recipe configs/{recipe} --overwrite
  # show the resolved configuration without training
  beit3 {cmd} --recipe configs/{recipe} --print-config
"""


EXAMPLE_RECIPE = {"pretrain": "pretrain_base.yaml", "finetune": "vqav2_base_480.yaml"}


def _add_parser(subparsers: argparse._SubParsersAction, kind: TaskKind, help_text: str) -> None:
    recipe = EXAMPLE_RECIPE[kind]
    parser = subparsers.add_parser(
        kind,
        help=help_text,
        description=help_text + ". See docs/training.md.",
        epilog=_EPILOG.format(cmd=kind, recipe=recipe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", help="YAML recipe (required unless --list-tasks), e.g. configs/" + recipe)
    parser.add_argument("--task", help="task name, overriding task.name of the recipe")
    if kind == "pretrain":
        parser.add_argument("--objective", metavar="TASK",
                            help="a pretraining task of the catalogue (--list-tasks): mdm, masked data modeling (the BEiT-3 pretraining); itc: image-text contrastive "
                                 "intermediate tuning of the dual encoder, as the released -itc checkpoints "
                                 "(same as --task mdm / --task itc)")
    parser.add_argument("--output-dir", help="run folder (train.output_dir)")
    parser.add_argument("--resume", help="'auto' (newest intact checkpoint in the run folder) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder holding another run: delete its checkpoints, final/, "
                             "metrics and summary first (train.overwrite=true); without it such a folder is refused")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--list-tasks", action="store_true", help="list the registered tasks and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    parser.set_defaults(func=lambda args: run(args, kind))


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    _add_parser(subparsers, "pretrain", summary("pretrain"))
    _add_parser(subparsers, "finetune", summary("finetune"))


def run(args: argparse.Namespace, kind: TaskKind) -> int:
    """Exit status: 0 done, 1 stopped on non-finite losses, 128+signal when stopped by a signal."""
    from beit3.catalogue import iter_tasks

    if args.list_tasks:
        for spec in iter_tasks(kind):
            aliases = f" (also {', '.join(spec.aliases)})" if spec.aliases else ""
            print(f"{spec.name:24s} {spec.description}{aliases}")
        return 0
    if not args.recipe or not Path(args.recipe).is_file():
        problem = f"recipe not found: {args.recipe}" if args.recipe else "--recipe is required"
        raise FileNotFoundError(f"{problem}; pass a YAML recipe such as configs/{EXAMPLE_RECIPE[kind]} "
                                "(the recipes of the release and tiny ones for the synthetic world are in configs/)")
    from beit3.io import ensure_writable_dir
    from beit3.training.config import load_config, resolve_paths
    from beit3.training.loop import Trainer
    from beit3.training.task import build_task

    overrides = list(args.overrides)
    objective = getattr(args, "objective", None)
    if objective and args.task and args.task != objective:
        raise ValueError(f"--objective {objective} and --task {args.task} disagree; give one of them")
    for flag, key in ((args.task or objective, "task.name"), (args.output_dir, "train.output_dir"), (args.resume, "train.resume")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    cfg = resolve_paths(load_config(args.recipe, overrides))
    if cfg.train.resume is not None and cfg.train.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: resume continues the run in the "
                         "folder, overwrite deletes it; give one of them")
    if not args.print_config:
        # A read-only or full destination fails here in one line, before any data or model is built.
        ensure_writable_dir(cfg.train.output_dir, "run folder (train.output_dir)")
    # The task checks its own options (task.options) when built, so --print-config shows only a
    # recipe the run accepts (building a task reads no data and builds no model).
    task = build_task(cfg, kind)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = Trainer(cfg, task).fit()
    if result.stop_reason == "nonfinite":
        print(textwrap.fill(f"beit3 {kind}: stopped after {cfg.train.max_nonfinite_steps} consecutive non-finite "
                            f"losses at step {result.step}; the last checkpoint is {result.last_checkpoint}"),
              file=sys.stderr)
        return 1
    if result.stop_reason == "signal":
        return 128 + int(result.signal_number or signal.SIGTERM)
    return 0
