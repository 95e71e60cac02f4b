"""Semantic segmentation (ADE20K-style folders): task ``segmentation``.

Images in ``<root>/<train_images>`` with label PNGs of the same name in ``<root>/<train_labels>``;
BEiT-3's vision path + simple feature pyramid + semantic-FPN head; cross-entropy ignoring 255.
Metric: mIoU (and pixel accuracy) over the validation split, accumulated across processes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from beit3.catalogue import TaskSpec, register_task
from beit3.data.dense import SemanticSegmentationDataset
from beit3.models.dense import Beit3ForSemanticSegmentation
from beit3.tasks.common import build_task_model, kept, parse_options
from beit3.tasks.dense_metrics import confusion_matrix, segmentation_scores
from beit3.training.config import RunConfig

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


@register_task
class SemanticSegmentationTask:
    spec = TaskSpec(
        name="segmentation", kind="finetune", aliases=("semantic-segmentation",),
        hub_pipeline_tag="image-segmentation",
        description="semantic segmentation (ADE20K-style folders): mIoU", model_class=Beit3ForSemanticSegmentation,
        metric="mIoU", statistics={"confusion": "sum"}, verb="segmentation",
        predict="beit3.tasks.predict_dense:add_dense",
    )

    collate_fn = staticmethod(default_collate)  # the datasets pad every sample to fixed shapes

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options(self.spec.name, cfg.task.options, DEFAULTS)
        self.num_classes = int(self.options["num_classes"])

    def build_model(self, cfg: RunConfig) -> nn.Module:
        o = self.options
        return build_task_model(self.spec.model_class, cfg, None, num_labels=self.num_classes,
                                out_channels=int(o["out_channels"]), window_size=int(o["window_size"]))

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o, root = self.options, Path(cfg.data.root or ".")
        common = dict(image_size=cfg.model.image_size, reduce_zero_label=bool(o["reduce_zero_label"]), seed=cfg.train.seed)
        train = SemanticSegmentationDataset(root / o["train_images"], root / o["train_labels"], train=True, **common)
        val = SemanticSegmentationDataset(root / o["val_images"], root / o["val_labels"], **common)
        return train, val

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss, {}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keep = kept(batch)
        prediction = model(pixel_values=batch["pixel_values"]).logits.argmax(1)
        return {"confusion": confusion_matrix(prediction[keep], batch["labels"][keep], self.num_classes).double()}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        return segmentation_scores(stats["confusion"])
