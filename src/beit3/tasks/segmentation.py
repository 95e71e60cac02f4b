"""Semantic segmentation (ADE20K-style folders): task ``segmentation``.

Images in ``<root>/<train_images>`` with label PNGs of the same name in ``<root>/<train_labels>``;
BEiT-3's vision path + simple feature pyramid + semantic-FPN head; cross-entropy ignoring 255.
Metric: mIoU (and pixel accuracy) over the validation split, accumulated across processes.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from beit3.data.dense import SemanticSegmentationDataset
from beit3.models.dense import Beit3ForSemanticSegmentation
from beit3.tasks.common import build_task_model, parse_options
from beit3.tasks.dense_metrics import confusion_matrix, segmentation_scores
from beit3.training.config import RunConfig
from beit3.training.distributed import all_reduce_sum
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {
    "num_classes": 150,
    "reduce_zero_label": True,  # ADE20K: label 0 is "other", ignored
    "train_images": "images/training",
    "train_labels": "annotations/training",
    "val_images": "images/validation",
    "val_labels": "annotations/validation",
    "out_channels": 256,
    "window_size": 0,
}


class SemanticSegmentationTask:
    metric_name = "mIoU"
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options("segmentation", cfg.task.options, DEFAULTS)
        self.num_classes = int(self.options["num_classes"])
        self.patch_size = 16

    def build_model(self, cfg: RunConfig) -> nn.Module:
        o = self.options
        model = build_task_model(Beit3ForSemanticSegmentation, cfg, None, num_labels=self.num_classes,
                                 out_channels=int(o["out_channels"]), window_size=int(o["window_size"]))
        self.patch_size = model.config.patch_size
        return model

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o, root = self.options, Path(cfg.data.root or ".")
        common = dict(image_size=cfg.model.image_size, reduce_zero_label=bool(o["reduce_zero_label"]), seed=cfg.train.seed)
        train = SemanticSegmentationDataset(root / o["train_images"], root / o["train_labels"], train=True, **common)
        val = SemanticSegmentationDataset(root / o["val_images"], root / o["val_labels"], **common)
        return train, val

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        for batch in batches:
            keep = ~batch["is_padding"]
            prediction = model(pixel_values=batch["pixel_values"]).logits.argmax(1)
            confusion += confusion_matrix(prediction[keep], batch["labels"][keep], self.num_classes).double()
        all_reduce_sum(confusion)
        return segmentation_scores(confusion)

    def num_tokens(self, batch: dict[str, Any]) -> int:
        pixels = batch["pixel_values"]
        return pixels.shape[0] * (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)


register_task("segmentation", "finetune", SemanticSegmentationTask, "semantic segmentation (ADE20K-style folders): mIoU")
