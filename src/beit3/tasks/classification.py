"""Image classification (ImageNet-1k or any class-folder index): task ``classification``.

Loss as in the release: with mixup / cutmix on, every batch is mixed (timm ``Mixup`` with
``prob=1``, ``switch_prob=0.5``, batch mode) and the targets are label-smoothed one-hots mixed with
the same weight, scored by soft-target cross-entropy; otherwise cross-entropy with label smoothing.
Metric: top-1 / top-5 accuracy in %; the best checkpoint is chosen on top-1.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beit3.catalogue import TaskSpec, register_task
from beit3.data import ImageClassificationDataset
from beit3.models import Beit3ForImageClassification
from beit3.tasks.common import IndexTask, SampleProcessor, image_transform, kept, majority_baseline
from beit3.tasks.metrics import topk_hits
from beit3.training.config import RunConfig

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


@register_task
class ImageClassificationTask(IndexTask):
    spec = TaskSpec(
        name="classification", kind="finetune", aliases=("imagenet", "image-classification"),
        hub_pipeline_tag="image-classification",
        description="image classification (ImageNet-1k, class folders): top-1/top-5",
        model_class=Beit3ForImageClassification, head_keys=("fc_norm.weight", "head.weight"),
        image_mode="imagenet", randaug=True, index="imagenet.{split}.index.jsonl", eval_split="val",
        splits=("val",), baseline=partial(majority_baseline, name="most frequent class"), probe_features=("image",), metric="acc1", statistics={"correct": "sum", "samples": "sum"},
        pipeline="beit3.pipelines:ClassificationPipeline", verb="classify",
        predict="beit3.tasks.predict:add_classify",
    )
    defaults = DEFAULTS
    raw_dataset = ImageClassificationDataset

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.num_classes = int(self.options["num_classes"])
        self.rng = np.random.default_rng(cfg.train.seed)

    def head_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes, "label_smoothing": float(self.options["label_smoothing"])}

    def dataset_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def processor(self, cfg: RunConfig, train: bool) -> SampleProcessor:
        o = self.options
        if not train:
            return SampleProcessor(image_transform(self.spec, cfg, False, o))
        return SampleProcessor(image_transform(self.spec, cfg, True, o, randaug=o["auto_augment"] is not None,
                                               random_erasing=float(o["reprob"])))

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pixels, labels = batch["pixel_values"], batch["labels"]
        mixup, cutmix = float(self.options["mixup"]), float(self.options["cutmix"])
        if mixup > 0 or cutmix > 0:
            pixels, labels = mix_batch(pixels, labels, self.num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                                       label_smoothing=float(self.options["label_smoothing"]), rng=self.rng)
        out = model(pixel_values=pixels, labels=labels)
        return out.loss, {}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keep = kept(batch)
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        return {"correct": topk_hits(logits, batch["labels"], (1, 5), keep), "samples": keep.sum()}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        top1, top5 = stats["correct"].tolist()
        count = max(float(stats["samples"]), 1.0)
        return {"acc1": 100 * top1 / count, "acc5": 100 * top5 / count, "samples": int(stats["samples"])}
