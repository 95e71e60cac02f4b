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
    parser.add_argument("--task", required=True,
                        help="a task of the catalogue with index splits (classification, vqav2, nlvr2, retrieval, "
                             "captioning, ...; `beit3 finetune --list-tasks` lists them all)")
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


PROGRESS_SECONDS = 30.0
"""Without a terminal (a log file, a pipe), evaluation progress is a plain stderr line this often."""
SHOWN_SKIPS = 5
"""Unreadable samples named one a line on stderr; the rest are counted (all are in the JSON)."""


def load_checkpoint(task: Any, folder: Path, image_size: int | None = None):
    """The task's model with the checkpoint's weights (a save_pretrained folder or an engine checkpoint),
    its position table resampled when ``image_size`` differs from the checkpoint's."""
    sizes = {"image_size": image_size} if image_size is not None else {}
    return task.spec.model_class.from_pretrained(folder, **sizes)


def format_table(title: str, metrics: dict[str, Any]) -> str:
    """Metric names and values: floats with 4 decimals, counts as whole numbers."""
    width = max(len(k) for k in metrics) if metrics else 0
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}" for k, v in metrics.items()]
    return "\n".join(lines)


def _number(value: Any) -> Any:
    """A metric as JSON writes it: counts stay ints (``samples 1000``, not ``1000.0``), the rest floats."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value if isinstance(value, int) else float(value)


def checkpoint_image_size(checkpoint: Path) -> int | None:
    """The image size in the checkpoint's config.json."""
    try:
        return int(json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["config"]["image_size"])
    except (ValueError, KeyError, TypeError):
        return None


def _sets_image_size(recipe: str | Path | None, overrides: list[str]) -> str | None:
    """Where model.image_size is set explicitly: an override, or the recipe file; None when it is not."""
    import yaml

    if any(o.split("=", 1)[0].strip() == "model.image_size" for o in overrides):
        return "the override model.image_size"
    if recipe is not None:
        try:
            raw = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "image_size" in raw["model"]:
            return f"{recipe} (model.image_size)"
    return None


class ScoredDataset:
    """The evaluation dataset, each sample flagged ``is_padding`` when it is not to be scored: the
    sampler's padding, and a row whose image could not be read (the index dataset gives the next
    readable sample in its place, which must not be scored twice; ``bad_rows`` says which)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, is_padding = key
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"evaluation samples must be dicts, got {type(item).__name__}")
        unreadable = index in getattr(self.dataset, "bad_rows", {})
        return {**item, "is_padding": bool(is_padding or unreadable)}


def with_progress(batches: Any, total: int, show: bool) -> Any:
    """``batches`` with progress on stderr: a tqdm bar on a terminal, else a line every
    ``PROGRESS_SECONDS`` (and one at the end)."""
    if not show:
        yield from batches
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(batches, total=total, desc="evaluate", unit="batch", file=sys.stderr)
        return
    start = last = time.perf_counter()
    done = 0
    for batch in batches:
        yield batch
        done += 1
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS or done == total:
            last = now
            print(f"evaluate: {done}/{total} batches ({100 * done // max(total, 1)} %), {now - start:.0f} s",
                  file=sys.stderr, flush=True)


def _write_result(out: Path, result: dict[str, Any]) -> None:
    """Write the JSON; a failure is one line that says the metrics are printed above."""
    from beit3.io import atomic_write_text, describe_os_error

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise OSError(f"cannot write {out}: {describe_os_error(err, reason_only=True)} (the metrics are printed "
                      "above; pass --output FILE in a writable folder to keep them)") from None


def run_evaluate(args: argparse.Namespace) -> int:
    import warnings

    import torch
    from torch.utils.data import DataLoader

    from beit3.catalogue import get_task
    from beit3.data.datasets import BadSampleWarning
    from beit3.io import ensure_writable_file
    from beit3.model_folder import check_model_kind, find_run_file, has_tokenizer, tokenizer_candidates
    from beit3.training import distributed as D
    from beit3.training.config import load_config
    from beit3.training.evaluation import accumulate, reduce_statistics
    from beit3.training.task import build_task

    spec = get_task(args.task, "finetune")
    if spec.index is None:  # the tasks that name their splits by index files are the ones evaluate scores
        raise ValueError(f"no evaluation for task {args.task!r}; pass --task with one of: {_task_names()}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "model.safetensors").is_file() or not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (model.safetensors + config.json): pass the "
                                "final/ folder of a `beit3 finetune` run, or convert an official .pth with `beit3 convert`")
    # another task's model: say so, before its run's options are read against this task
    check_model_kind(checkpoint, spec.model_class, spec.name,
                     lambda other: f"pass --task {other.name}" if other.index else f"it is for task {other.name}")
    if args.output:  # a read-only or full destination fails now, not after the evaluation
        ensure_writable_file(args.output, "--output file")
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
    # Images are preprocessed at the checkpoint's size, unless a recipe or override says otherwise.
    trained_size = checkpoint_image_size(checkpoint)
    image_size = None
    if trained_size is not None:
        setter = _sets_image_size(recipe, list(args.overrides))
        if setter is not None and cfg.model.image_size != trained_size:
            print(f"note: evaluating at {cfg.model.image_size} px as {setter} says; the checkpoint was trained at "
                  f"{trained_size} px (its position table is resampled)", file=sys.stderr)
            image_size = cfg.model.image_size
        else:
            cfg.model.image_size = trained_size

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
    _, dataset = task.build_datasets(cfg)
    model = load_checkpoint(task, checkpoint, image_size).to(dist_info.device).eval()
    sampler = D.EvalSampler(len(dataset), dist_info.rank, dist_info.world_size)
    loader = DataLoader(ScoredDataset(dataset), batch_size=args.batch_size, sampler=sampler,
                        collate_fn=D.EvalCollate(getattr(task, "collate_fn", None)))

    def batches():
        for batch in loader:
            yield {k: v.to(dist_info.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    start = time.perf_counter()
    statistics = task.spec.statistics
    totals: dict[str, Any] = {}
    with torch.no_grad(), warnings.catch_warnings():
        # unreadable images are counted and reported below, not warned about one by one
        warnings.simplefilter("ignore", BadSampleWarning)
        for batch in with_progress(batches(), len(loader), dist_info.is_main):
            accumulate(totals, task.eval_step(model, batch), statistics)
        stats = reduce_statistics(totals, statistics, dist_info.device)
    unreadable: dict[int, str] = {}
    for part in D.all_gather_objects(dict(getattr(dataset, "bad_rows", {}))):
        unreadable.update(part)
    if len(unreadable) >= len(dataset):
        raise ValueError(f"nothing was scored: none of the {len(dataset)} samples of {index} has a readable image "
                         f"(e.g. {next(iter(unreadable.values()))})")
    metrics = {k: _number(v) for k, v in task.compute_metrics(stats).items()}
    if unreadable:
        metrics["skipped"] = len(unreadable)
    extra: dict[str, Any] = {}
    if spec.evaluate_hook is not None:
        first = dataset[next(i for i in range(len(dataset)) if i not in unreadable)]
        context = {"split": split, "checkpoint": str(checkpoint), "output": args.output, "is_main": dist_info.is_main,
                   "coco_toolkit": args.coco_toolkit, "has_labels": "labels" in first}
        extra = dict(spec.evaluate_hook(task, stats, context))
        metrics.update({k: _number(v) for k, v in extra.pop("metrics", {}).items()})
    elapsed = time.perf_counter() - start

    if dist_info.is_main:
        skipped = [{"row": row, "reason": reason} for row, reason in sorted(unreadable.items())]
        result = {"task": spec.name, "checkpoint": str(checkpoint), "split": split, "index": str(index),
                  "processes": dist_info.world_size, "seconds": round(elapsed, 2), "image_size": cfg.model.image_size,
                  "metrics": metrics, **({"skipped": skipped} if skipped else {}), **extra}
        out = Path(args.output) if args.output and "submission" not in extra else \
            checkpoint / f"eval_{spec.name}_{split}.json"
        # the table first: a folder that cannot take the JSON must not lose the numbers
        print(format_table(f"{spec.name} on {split} ({checkpoint})", metrics), flush=True)
        if skipped:
            print(f"skipped {len(skipped)} of {len(dataset)} samples whose image could not be read (not scored):",
                  file=sys.stderr)
            for item in skipped[:SHOWN_SKIPS]:
                print(f"  {item['reason']}", file=sys.stderr)
            if len(skipped) > SHOWN_SKIPS:
                print(f"  ... and {len(skipped) - SHOWN_SKIPS} more (all listed in the JSON)", file=sys.stderr)
        _write_result(out, result)
        print(f"written: {out}", file=sys.stderr)
    D.shutdown_distributed()
    return 0
