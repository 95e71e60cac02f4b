"""Object detection and instance segmentation on COCO-format data: task ``detection``.

Mask R-CNN on BEiT-3's simple feature pyramid. Metric: COCO box and mask AP computed by
`pycocotools` against the annotation file, over the images of the validation split (gathered
from every process). The best checkpoint is chosen on box AP.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from beit3.catalogue import TaskSpec, register_task
from beit3.data.dense import CocoInstanceDataset, unpad_targets
from beit3.models.dense import Beit3ForInstanceSegmentation
from beit3.tasks.common import build_task_model, kept, parse_options
from beit3.training.config import RunConfig

DEFAULTS: dict[str, Any] = {
    "num_classes": 80,
    "train_images": "train2017",
    "train_annotations": "annotations/instances_train2017.json",
    "val_images": "val2017",
    "val_annotations": "annotations/instances_val2017.json",
    "max_objects": 100,
    "out_channels": 256,
    "window_size": 0,
    "rois_per_image": 512,
}


def coco_results(detections: list[dict[str, torch.Tensor]], image_ids: list[int], scales: torch.Tensor,
                 category_ids: list[int], original_sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Model detections (in resized pixels) -> COCO result records in original image pixels,
    with masks as RLE."""
    from pycocotools import mask as mask_utils

    records = []
    for detection, image_id, (sx, sy), (height, width) in zip(detections, image_ids, scales.tolist(), original_sizes):
        boxes = detection["boxes"] / torch.tensor([sx, sy, sx, sy])
        masks = detection.get("masks")
        if masks is not None and len(masks):
            masks = F.interpolate(masks.float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0] > 0.5
        for k in range(len(boxes)):
            x0, y0, x1, y1 = boxes[k].tolist()
            record = {"image_id": int(image_id), "category_id": category_ids[int(detection["labels"][k]) - 1],
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(detection["scores"][k])}
            if masks is not None and len(masks):
                rle = mask_utils.encode(np.asfortranarray(masks[k].numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                record["segmentation"] = rle
            records.append(record)
    return records


def coco_average_precision(annotation_file: str | Path, results: list[dict[str, Any]], image_ids: list[int],
                           kind: str) -> dict[str, float]:
    """AP, AP50, AP75 (in %) of ``kind`` ("bbox" or "segm") over ``image_ids`` with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    prefix = "box" if kind == "bbox" else "mask"
    if not results:
        return {f"{prefix}_AP": 0.0, f"{prefix}_AP50": 0.0, f"{prefix}_AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(annotation_file))
        evaluation = COCOeval(truth, truth.loadRes(results), kind)
        evaluation.params.imgIds = sorted(set(image_ids))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(v)) * 100 for v in evaluation.stats[:3]]  # pycocotools uses -1 for "no data"
    return {f"{prefix}_AP": stats[0], f"{prefix}_AP50": stats[1], f"{prefix}_AP75": stats[2]}


@register_task
class DetectionTask:
    spec = TaskSpec(
        name="detection", kind="finetune", aliases=("instance-segmentation",),
        hub_pipeline_tag="object-detection",
        description="detection + instance segmentation (COCO format): box/mask AP",
        model_class=Beit3ForInstanceSegmentation, metric="box_AP",
        statistics={"records": "gather", "image_ids": "gather"}, verb="detection",
        predict="beit3.tasks.predict_dense:add_dense",
    )

    collate_fn = staticmethod(default_collate)  # the datasets pad every sample to fixed shapes

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options(self.spec.name, cfg.task.options, DEFAULTS)
        self.val: CocoInstanceDataset | None = None

    def build_model(self, cfg: RunConfig) -> nn.Module:
        o = self.options
        return build_task_model(self.spec.model_class, cfg, None, num_labels=int(o["num_classes"]),
                                out_channels=int(o["out_channels"]), window_size=int(o["window_size"]),
                                rois_per_image=int(o["rois_per_image"]))

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o, root = self.options, Path(cfg.data.root or ".")
        common = dict(image_size=cfg.model.image_size, max_objects=int(o["max_objects"]), seed=cfg.train.seed)
        train = CocoInstanceDataset(root / o["train_images"], root / o["train_annotations"], train=True, **common)
        self.val = CocoInstanceDataset(root / o["val_images"], root / o["val_annotations"], **common)
        if len(train.categories) != int(o["num_classes"]):
            raise ValueError(f"task.options.num_classes is {o['num_classes']} but {train.annotation_file} "
                             f"has {len(train.categories)} categories")
        return train, self.val

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["pixel_values"], unpad_targets(batch))
        return out.loss, {name: float(value.detach()) for name, value in out.losses.items()}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, list]:
        """COCO result records of the batch's (counted) images. Every process runs the forward on
        its whole batch, padding included, so sharded models stay in step."""
        assert self.val is not None, "build_datasets runs before evaluation"
        keep = kept(batch).tolist()
        detections = model(batch["pixel_values"]).detections
        rows = [i for i, k in enumerate(keep) if k]
        ids = batch["image_id"][rows].tolist()
        records = coco_results([detections[i] for i in rows], ids, batch["scale"][rows], self.val.category_ids,
                               [self.image_sizes[i] for i in ids])
        return {"records": records, "image_ids": ids}

    @cached_property
    def image_sizes(self) -> dict[int, tuple[int, int]]:
        """(height, width) of each validation image by id, for boxes and masks in original pixels."""
        assert self.val is not None, "build_datasets runs before evaluation"
        return {info["id"]: (info["height"], info["width"]) for info in self.val.images}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        assert self.val is not None, "build_datasets runs before evaluation"
        records, image_ids = stats["records"], stats["image_ids"]
        scores = coco_average_precision(self.val.annotation_file, records, image_ids, "bbox")
        scores.update(coco_average_precision(self.val.annotation_file, records, image_ids, "segm"))
        return scores
