"""Linear probes on frozen features: what a backbone knows, measured without fine-tuning it.

A fine-tuning run changes every weight, so the gain of pretraining it shows mixes what the weights
knew with how fast they moved; on a small validation set it is also noisy from seed to seed. A
linear probe freezes the backbone, pools its last hidden state into one vector per sample, and
fits a ridge regression from those vectors to the task's targets in closed form: no random
numbers, no schedule, the same answer on every run. It asks one question, "is the answer a linear
function of these features?", of a pretrained backbone and of the same architecture at its random
initialisation.

Features (``--features``):

* ``image``: the image alone through the vision experts (classification);
* ``text``: the text alone through the language experts (VQA: the answer from the question only);
* ``pair``: image and text in one fused pass (VQA: the answer from both).

Each sample's vector is the first token's final state (CLS or BOS) beside the mean over its
tokens (the text's real tokens; every image token). The targets are the task's: one-hot classes
scored by top-1, or VQA's soft answer scores scored by the VQA score of the top answer. The ridge
strength is picked on a seeded random fifth of the training split, then refitted on all of it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ALPHAS = tuple(10.0 ** k for k in range(-3, 5))
"""Ridge strengths tried (on standardised features)."""


@dataclass(frozen=True)
class ProbeResult:
    """A probe's validation score (%) with the ridge strength picked and the sizes involved."""

    score: float
    train_score: float
    alpha: float
    features: str
    dim: int
    train_samples: int
    val_samples: int


def pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states and (B, T) token weights (1 = a real token) -> (B, 2D): first token | mean."""
    weights = weights.to(hidden.dtype)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.cat([hidden[:, 0], mean], dim=-1)


@torch.no_grad()
def frozen_features(backbone: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], features: str,
                    num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled final states of ``backbone`` (a :class:`~beit3.models.Beit3Model`) over ``batches``, and the
    targets as a (N, C) float matrix: one-hot for integer ``labels`` (``num_classes`` columns), VQA's soft
    scores as they are."""
    if features not in ("image", "text", "pair"):
        raise ValueError(f"features must be image, text or pair, got {features!r}")
    backbone.eval()
    rows, targets = [], []
    for batch in batches:
        pixels = batch["pixel_values"] if features in ("image", "pair") else None
        ids = batch.get("input_ids") if features in ("text", "pair") else None
        if features != "image" and ids is None:
            raise ValueError(f"{features} features need text, but the samples have no input_ids")
        mask = batch.get("attention_mask") if ids is not None else None
        hidden = backbone(pixel_values=pixels, input_ids=ids, attention_mask=mask).last_hidden_state
        weights = torch.ones(hidden.shape[:2], device=hidden.device)
        if mask is not None:  # text tokens come after the image's; padding counts for nothing
            weights[:, hidden.shape[1] - mask.shape[1]:] = mask
        rows.append(pool(hidden.float(), weights))
        labels = batch["labels"]
        if labels.dtype == torch.long:
            if num_classes is None:
                raise ValueError("integer labels need num_classes")
            labels = nn.functional.one_hot(labels, num_classes)
        targets.append(labels.float())
    if not rows:
        raise ValueError("no samples to probe")
    return torch.cat(rows), torch.cat(targets)


def _fit(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    gram = x.T @ x + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    gram[-1, -1] -= alpha  # the bias column is not shrunk
    return torch.linalg.solve(gram, x.T @ y)


def _score(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> float:
    """% of the target mass on the predicted column: top-1 for one-hot targets, the VQA score for soft ones."""
    picked = (x @ weights).argmax(1)
    return float(100 * y[torch.arange(len(y)), picked].mean())


def ridge_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                alphas: Sequence[float] = ALPHAS, features: str = "") -> ProbeResult:
    """Fit ridge regressions from standardised features (with a bias) to the targets, pick the strength
    on a seeded random fifth of ``train``, refit on all of ``train`` and score ``val``. Deterministic."""
    (x_train, y_train), (x_val, y_val) = train, val
    if len(x_train) < 5 or len(x_val) == 0:
        raise ValueError(f"a probe needs at least 5 training and 1 validation samples, got {len(x_train)} and {len(x_val)}")
    x_train, y_train, x_val, y_val = (t.double() for t in (x_train, y_train, x_val, y_val))
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)

    def design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)

    a_train, a_val = design(x_train), design(x_val)
    # index files are often sorted by label: hold out a seeded random fifth, not the last rows
    order = torch.randperm(len(a_train), generator=torch.Generator().manual_seed(0))
    held_out, fit_on = order[: max(1, len(order) // 5)], order[max(1, len(order) // 5):]
    held = {alpha: _score(a_train[held_out], y_train[held_out], _fit(a_train[fit_on], y_train[fit_on], alpha))
            for alpha in alphas}
    best = max(alphas, key=lambda alpha: (held[alpha], alpha))  # ties: the stronger (simpler) fit
    weights = _fit(a_train, y_train, best)
    return ProbeResult(score=_score(a_val, y_val, weights), train_score=_score(a_train, y_train, weights), alpha=best,
                       features=features, dim=x_train.shape[1], train_samples=len(x_train), val_samples=len(x_val))


# ------------------------------------------------------------------------------------------ command
_EPILOG = """\
examples:
  # the image probe of a pretrained folder, and of the same architecture at random initialisation
  beit3 probe --recipe configs/tiny_imagenet.yaml data.root=data/index model.pretrained=runs/pretrained
  beit3 probe --recipe configs/tiny_imagenet.yaml data.root=data/index
  # VQA answers from the frozen fused image-question features, or from the question alone
  beit3 probe --recipe configs/tiny_vqav2.yaml --features pair data.root=data/index \\
      task.options.tokenizer=data/tokenizer model.pretrained=runs/pretrained --output probes/vqa_pair.json

The backbone is the one `beit3 finetune` would start from with the same recipe and overrides: the
weights of model.pretrained, or the preset's random initialisation (seeded by train.seed) when it is
unset. Images go through the task's evaluation transform. Prints a table; --output writes JSON.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "probe", help=summary("probe"), epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit a linear (ridge) probe on a frozen backbone's pooled features of a task's training split "
                    "and score it on the validation split.")
    parser.add_argument("--recipe", required=True, help="a fine-tuning recipe of a task with a probe "
                        "(classification: image features; vqav2: pair or text features)")
    parser.add_argument("--features", choices=("image", "text", "pair"),
                        help="what goes through the backbone (default: the task's first, see --recipe)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per forward pass")
    parser.add_argument("--output", help="JSON file to write the result to")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    parser.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from beit3.io import atomic_write_text, ensure_writable_file
    from beit3.tasks.common import unwrap
    from beit3.training.config import load_config
    from beit3.training.task import build_task

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.output:
        ensure_writable_file(args.output, "--output file")
    from beit3.catalogue import iter_tasks

    cfg = load_config(args.recipe, list(args.overrides))
    probed = [spec.name for spec in iter_tasks("finetune") if spec.probe_features]
    allowed = next((spec.probe_features for spec in iter_tasks("finetune") if cfg.task.name in spec.names), ())
    if not allowed:
        raise ValueError(f"task {cfg.task.name!r} has no linear probe; probes exist for {', '.join(probed)}")
    features = args.features or allowed[0]
    if features not in allowed:
        raise ValueError(f"task {cfg.task.name} probes {' or '.join(allowed)} features, not {features}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = build_task(cfg, "finetune")
    if hasattr(task, "setup"):
        task.setup(cfg, None)
    torch.manual_seed(cfg.train.seed)  # the random initialisation `beit3 finetune` would start from
    backbone = unwrap(task.build_model(cfg)).backbone.eval()
    num_classes = getattr(task, "num_classes", None)
    collate = getattr(task, "collate_fn", None)
    start = time.perf_counter()
    splits = {}
    for split, names in (("train", task.train_index()), ("val", task.val_index())):
        loader = DataLoader(task.dataset(cfg, names, train=False), batch_size=args.batch_size, collate_fn=collate)
        splits[split] = frozen_features(backbone, loader, features, num_classes)
    result = ridge_probe(splits["train"], splits["val"], features=features)
    source = cfg.model.pretrained or f"random initialisation (preset {cfg.model.preset}, seed {cfg.train.seed})"
    report = {"task": cfg.task.name, "model": str(source), "seconds": round(time.perf_counter() - start, 2),
              **asdict(result)}
    print(f"linear probe, {cfg.task.name} from {features} features of {source}: {result.score:.2f} "
          f"(train {result.train_score:.2f}, ridge alpha {result.alpha:g}, {result.dim} features, "
          f"{result.train_samples} / {result.val_samples} samples)")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return 0 if math.isfinite(result.score) else 1
