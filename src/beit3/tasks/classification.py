"""Image classification (ImageNet-1k or any class-folder index): task ``imagenet``.

Loss as in the release: with mixup / cutmix on, every batch is mixed (timm ``Mixup`` with
``prob=1``, ``switch_prob=0.5``, batch mode) and the targets are label-smoothed one-hots mixed with
the same weight, scored by soft-target cross-entropy; otherwise cross-entropy with label smoothing.
Metric: top-1 / top-5 accuracy in %; the best checkpoint is chosen on top-1.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from beit3.data import Collator, ImageClassificationDataset
from beit3.models import Beit3ForImageClassification
from beit3.tasks.common import ProcessedDataset, build_task_model, count_tokens, image_processor, index_files, parse_options
from beit3.tasks.metrics import topk_correct
from beit3.training.config import RunConfig
from beit3.training.distributed import all_reduce_sum
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {
    "num_classes": 1000,
    "mixup": 0.0,
    "cutmix": 0.0,
    "label_smoothing": 0.1,
    "auto_augment": None,
    "reprob": 0.25,
}


def mix_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float,
    label_smoothing: float, rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with its reverse (timm ``Mixup``, mode "batch"): returns images and soft targets.

    When both alphas are positive, cutmix is chosen with probability 0.5. Cutmix pastes a box of
    area ~(1 - lam) and lam is corrected to the area actually kept after clipping to the image.
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - float((y1 - y0) * (x1 - x0)) / (height * width)
    else:
        mixed = pixel_values * lam + flipped * (1 - lam)
    off = label_smoothing / num_classes
    one_hot = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + off  # (B, C)
    return mixed, one_hot * lam + one_hot.flip(0) * (1 - lam)


class ImageClassificationTask:
    metric_name = "acc1"
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options("imagenet", cfg.task.options, DEFAULTS)
        self.num_classes = int(self.options["num_classes"])
        self.patch_size = 16
        self.rng = np.random.default_rng(cfg.train.seed)

    model_class = Beit3ForImageClassification

    def head_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes, "label_smoothing": float(self.options["label_smoothing"])}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = build_task_model(self.model_class, cfg, None, **self.head_args())
        self.patch_size = model.config.patch_size
        return model

    default_split = "val"

    def split_index(self, split: str) -> str:
        return f"imagenet.{split}.index.jsonl"

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o = self.options
        train_raw = ImageClassificationDataset(index_files(cfg.data.root, o["train_index"] or "imagenet.train.index.jsonl"))
        val_raw = ImageClassificationDataset(index_files(cfg.data.root, o["val_index"] or "imagenet.val.index.jsonl"))
        train_images = image_processor("classification", cfg, True, o, randaug=o["auto_augment"] is not None,
                                       random_erasing=float(o["reprob"]))
        val_images = image_processor("classification", cfg, False, o)
        # the image processor is itself a processor-like callable: images=[...] -> pixel_values
        return ProcessedDataset(train_raw, Collator(train_images)), ProcessedDataset(val_raw, Collator(val_images))

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pixels, labels = batch["pixel_values"], batch["labels"]
        mixup, cutmix = float(self.options["mixup"]), float(self.options["cutmix"])
        if mixup > 0 or cutmix > 0:
            pixels, labels = mix_batch(pixels, labels, self.num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                                       label_smoothing=float(self.options["label_smoothing"]), rng=self.rng)
        out = model(pixel_values=pixels, labels=labels)
        return out.loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        sums = torch.zeros(3, dtype=torch.float64)  # top-1, top-5, samples
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(pixel_values=batch["pixel_values"]).logits.float()
            hits = topk_correct(logits[keep], batch["labels"][keep], (1, 5))
            sums += torch.tensor([hits[1], hits[5], int(keep.sum())], dtype=torch.float64)
        all_reduce_sum(sums)
        count = max(sums[2].item(), 1.0)
        return {"acc1": 100 * sums[0].item() / count, "acc5": 100 * sums[1].item() / count, "samples": sums[2].item()}

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return count_tokens(batch, self.patch_size)


register_task("imagenet", "finetune", ImageClassificationTask, "image classification (ImageNet-1k, class folders): top-1/top-5")
