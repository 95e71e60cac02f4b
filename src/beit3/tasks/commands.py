"""`beit3 evaluate`: score a fine-tuned checkpoint on a split, write JSON and print a table."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_EPILOG = """\
examples:
  beit3 evaluate --task vqav2 --checkpoint runs/vqa/final --data-root data/index --split rest_val  # soft + official
  beit3 evaluate --task vqav2 --checkpoint runs/vqa/final --split test-dev     # writes the EvalAI file
  beit3 evaluate --task retrieval --checkpoint runs/coco_ret/final --split test
  torchrun --nproc_per_node 8 -m beit3 evaluate --task nlvr2 --checkpoint runs/nlvr2/final --split test-P
  beit3 evaluate --task captioning --checkpoint runs/cap/final --split test --coco-toolkit

The task options (tokenizer, text length, beam size, ...) come from the run.yaml the training wrote
next to the checkpoint (or --recipe); `section.key=value` overrides them as in `beit3 finetune`.
VQAv2 reports vqa_score (the release's soft score) and vqa_accuracy (the official VQA accuracy, also
per answer type); see docs/tasks.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "evaluate",
        help=summary("evaluate"),
        description="Evaluate a checkpoint with the task's metric on one split, over every process of a "
        "torchrun launch, and write the result as JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="a task of the catalogue with index splits: " + _task_names())
    parser.add_argument("--checkpoint", required=True, help="a folder with model.safetensors and config.json")
    parser.add_argument("--recipe", help="run config to read task options from (default: the run.yaml near the checkpoint)")
    parser.add_argument("--data-root", help="folder of the index files (default: data.root of the run)")
    parser.add_argument("--split", help="split name, e.g. val, test, rest_val, test-dev, dev, test-P")
    parser.add_argument("--index", help="an index file to evaluate instead of --split")
    parser.add_argument("--tokenizer", help="tokenizer file or folder (default: the run's, or the checkpoint folder's)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-process batch size")
    parser.add_argument("--output", help="JSON file to write (default: <checkpoint>/eval_<task>_<split>.json)")
    parser.add_argument("--coco-toolkit", action="store_true",
                        help="captioning: also BLEU, METEOR, ROUGE-L and CIDEr with pycocoevalcap (needs java)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the run config")
    parser.set_defaults(func=run_evaluate)


def _task_names() -> str:
    from beit3.catalogue import iter_tasks

    return ", ".join(spec.name for spec in iter_tasks("finetune", having="index"))


def load_checkpoint(task: Any, folder: Path):
    """The task's model with the checkpoint's weights (a save_pretrained folder or an engine checkpoint)."""
    return task.spec.model_class.from_pretrained(folder)


def format_table(title: str, metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics) if metrics else 0
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}" for k, v in metrics.items()]
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from beit3.catalogue import get_task
    from beit3.model_folder import find_run_file, has_tokenizer, tokenizer_candidates
    from beit3.training import distributed as D
    from beit3.training.config import load_config
    from beit3.training.evaluation import evaluate_batches
    from beit3.training.task import build_task

    spec = get_task(args.task, "finetune")
    if spec.index is None:  # the tasks that name their splits by index files are the ones evaluate scores
        raise ValueError(f"no evaluation for task {args.task!r}; pass --task with one of: {_task_names()}")
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "model.safetensors").is_file() or not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (model.safetensors + config.json): pass the "
                                "final/ folder of a `beit3 finetune` run, or convert an official .pth with `beit3 convert`")
    recipe = args.recipe or find_run_file(checkpoint)
    overrides = [f"task.name={spec.name}"] + list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.tokenizer:
        overrides.append(f"task.options.tokenizer={args.tokenizer}")
    cfg = load_config(recipe, overrides)
    if not cfg.task.options.get("tokenizer"):  # the checkpoint's own, else the one it was trained from
        found = [p for p in tokenizer_candidates(checkpoint, [cfg.model.pretrained]) if has_tokenizer(p)]
        if found:
            cfg.task.options["tokenizer"] = str(found[0])
    cfg.model.pretrained = None  # the weights come from --checkpoint

    if args.split and not args.index and args.split not in {spec.eval_split, *spec.splits}:
        raise ValueError(f"task {spec.name} has no split {args.split!r}; its splits: "
                         f"{', '.join(dict.fromkeys((spec.eval_split, *spec.splits)))} (or pass --index FILE)")
    probe = build_task(cfg, "finetune")
    split = args.split or ("index" if args.index else spec.eval_split)
    index = args.index or probe.split_index(split)
    # evaluation only: point both splits at the one evaluated, so no training index is needed
    cfg.task.options.update(train_index=index, val_index=index)
    task = build_task(cfg, "finetune")

    dist_info = D.init_distributed()
    model = load_checkpoint(task, checkpoint).to(dist_info.device).eval()
    _, dataset = task.build_datasets(cfg)
    loader = DataLoader(D.EvalDataset(dataset), batch_size=args.batch_size,
                        sampler=D.EvalSampler(len(dataset), dist_info.rank, dist_info.world_size),
                        collate_fn=D.EvalCollate(getattr(task, "collate_fn", None)))

    def batches():
        for batch in loader:
            yield {k: v.to(dist_info.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    start = time.perf_counter()
    with torch.no_grad():
        metrics, stats = evaluate_batches(task, model, batches(), dist_info.device)
    extra: dict[str, Any] = {}
    if spec.evaluate_hook is not None:
        context = {"split": split, "checkpoint": str(checkpoint), "output": args.output, "is_main": dist_info.is_main,
                   "coco_toolkit": args.coco_toolkit, "has_labels": "labels" in dataset[0]}
        extra = dict(spec.evaluate_hook(task, stats, context))
        metrics.update(extra.pop("metrics", {}))
    elapsed = time.perf_counter() - start

    if dist_info.is_main:
        result = {"task": spec.name, "checkpoint": str(checkpoint), "split": split, "index": str(index),
                  "processes": dist_info.world_size, "seconds": round(elapsed, 2), "metrics": metrics, **extra}
        out = Path(args.output) if args.output and "submission" not in extra else \
            checkpoint / f"eval_{spec.name}_{split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(f"{spec.name} on {split} ({checkpoint})", metrics))
        print(f"written: {out}", file=sys.stderr)
    D.shutdown_distributed()
    return 0
