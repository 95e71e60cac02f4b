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
    parser = subparsers.add_parser(
        "evaluate",
        help="score a fine-tuned checkpoint on a split (JSON + table)",
        description="Evaluate a checkpoint with the task's metric on one split, over every process of a "
        "torchrun launch, and write the result as JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="imagenet, vqav2, nlvr2, retrieval or captioning")
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


def _find_run_yaml(checkpoint: Path) -> Path | None:
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / "run.yaml").is_file():
            return folder / "run.yaml"
    return None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or any(folder.glob("*.spm"))


def load_checkpoint(task: Any, folder: Path):
    """The task's model with the checkpoint's weights (a save_pretrained folder or an engine checkpoint)."""
    return task.model_class.from_pretrained(folder)


def format_table(title: str, metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics) if metrics else 0
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}" for k, v in metrics.items()]
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from beit3.tasks.captioning import CaptioningTask, simple_tokenize
    from beit3.tasks.metrics import cider_d, coco_caption_scores, write_vqa_submission
    from beit3.tasks.vqav2 import VQATask
    from beit3.training import distributed as D
    from beit3.training.config import load_config
    from beit3.training.task import build_task, registered_tasks

    # the tasks that name their splits (split_index) are the ones evaluate can score
    tasks = sorted(name for name, entry in registered_tasks().items()
                   if entry.kind == "finetune" and hasattr(entry.factory, "split_index"))
    if args.task not in tasks:
        raise ValueError(f"no evaluation for task {args.task!r}; pass --task with one of: {', '.join(tasks)}")
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "model.safetensors").is_file() or not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (model.safetensors + config.json): pass the "
                                "final/ folder of a `beit3 finetune` run, or convert an official .pth with `beit3 convert`")
    recipe = args.recipe or _find_run_yaml(checkpoint)
    overrides = [f"task.name={args.task}"] + list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.tokenizer:
        overrides.append(f"task.options.tokenizer={args.tokenizer}")
    cfg = load_config(recipe, overrides)
    if not cfg.task.options.get("tokenizer"):  # the checkpoint's own, else the one it was trained from
        for folder in (checkpoint, Path(cfg.model.pretrained) if cfg.model.pretrained else None):
            if folder is not None and folder.is_dir() and _has_tokenizer(folder):
                cfg.task.options["tokenizer"] = str(folder)
                break
    cfg.model.pretrained = None  # the weights come from --checkpoint

    probe = build_task(cfg, "finetune")
    split = args.split or ("index" if args.index else probe.default_split)
    index = args.index or probe.split_index(split)
    # evaluation only: point both splits at the one evaluated, so no training index is needed
    cfg.task.options.update(train_index=index, val_index=index)
    task = build_task(cfg, "finetune")

    dist_info = D.init_distributed()
    model = load_checkpoint(task, checkpoint).to(dist_info.device).eval()
    task.patch_size = model.config.patch_size
    _, dataset = task.build_datasets(cfg)
    loader = DataLoader(D.EvalDataset(dataset), batch_size=args.batch_size,
                        sampler=D.EvalSampler(len(dataset), dist_info.rank, dist_info.world_size))

    def batches():
        for batch in loader:
            yield {k: v.to(dist_info.device) for k, v in batch.items()}

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    with torch.no_grad():
        if isinstance(task, VQATask) and "labels" not in dataset[0]:
            predictions = task.predict(model, batches())
            target = Path(args.output or checkpoint / f"submit_vqav2_{split}.json")
            if dist_info.is_main:
                write_vqa_submission(target, predictions)
            metrics = {"questions": float(len({q for q, _ in predictions}))}
            extra["submission"] = str(target)
        elif isinstance(task, CaptioningTask):
            captions = task.predict(model, batches())
            refs = {k: [simple_tokenize(r) for r in task.references[k]] for k in captions}
            metrics = {"cider": cider_d({k: simple_tokenize(v) for k, v in captions.items()}, refs)[0],
                       "images": float(len(captions))}
            if args.coco_toolkit and dist_info.is_main:
                metrics.update(coco_caption_scores(captions, {k: task.references[k] for k in captions}))
            extra["predictions"] = [{"image_id": k, "caption": v} for k, v in sorted(captions.items())]
        else:
            metrics = task.evaluate(model, batches())
    elapsed = time.perf_counter() - start

    if dist_info.is_main:
        result = {"task": args.task, "checkpoint": str(checkpoint), "split": split, "index": str(index),
                  "processes": dist_info.world_size, "seconds": round(elapsed, 2), "metrics": metrics, **extra}
        out = Path(args.output) if args.output and "submission" not in extra else \
            checkpoint / f"eval_{args.task}_{split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(f"{args.task} on {split} ({checkpoint})", metrics))
        print(f"written: {out}", file=sys.stderr)
    D.shutdown_distributed()
    return 0
