"""Datasets for dense prediction: ADE20K-style semantic segmentation folders and COCO instances.

Both return fixed-shape tensors so the default collate can batch them: images are resized to a
square side, and instance targets are padded to ``max_objects`` with a ``num_objects`` count.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from beit3.data.index import EmptyDatasetError, IndexFormatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) floats in [0, 1] (bilinear resize)."""
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


class SemanticSegmentationDataset(Dataset):
    """``images/<name>.<ext>`` paired with ``labels/<name>.png`` (one class id per pixel).

    ``reduce_zero_label`` follows ADE20K: label 0 ("other") becomes the ignore index 255 and every
    other label drops by one. Samples: ``pixel_values`` normalised with mean = std = 0.5 and
    ``labels`` (size, size) long; training flips image and labels together.
    """

    def __init__(self, images: str | Path, labels: str | Path, *, image_size: int, train: bool = False,
                 reduce_zero_label: bool = False, seed: int = 0):
        self.images_dir, self.labels_dir = Path(images), Path(labels)
        for folder in (self.images_dir, self.labels_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder not found: {folder}")
        label_files = {p.stem: p for p in self.labels_dir.glob("*.png")}
        self.pairs = [(p, label_files[p.stem]) for p in sorted(self.images_dir.iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in label_files]
        if not self.pairs:
            raise EmptyDatasetError(f"no image in {self.images_dir} has a label PNG of the same name in {self.labels_dir}")
        self.image_size, self.train, self.reduce_zero_label = image_size, train, reduce_zero_label
        self.random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = _image_tensor(Image.open(image_path), self.image_size)
        label = Image.open(label_path).resize((self.image_size, self.image_size), Image.NEAREST)
        labels = torch.from_numpy(np.array(label, dtype=np.int64))
        if labels.dim() != 2:
            raise IndexFormatError(label_path, None, f"a label map must have one channel, got shape {tuple(labels.shape)}")
        if self.reduce_zero_label:
            labels = torch.where(labels == 0, torch.full_like(labels, 255), labels - 1)
        if self.train and self.random.random() < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return {"pixel_values": (image - 0.5) / 0.5, "labels": labels}


class CocoInstanceDataset(Dataset):
    """COCO ``instances_*.json`` + image folder -> image and padded instance targets.

    Category ids are mapped to contiguous labels 1..K (0 is the background, as torchvision's
    detectors expect); ``categories`` keeps the names in that order. Samples: ``pixel_values``
    (3, S, S) in [0, 1], ``boxes`` (M, 4) xyxy in resized pixels, ``classes`` (M,), ``masks``
    (M, S, S) uint8, ``num_objects`` and the COCO ``image_id``; M = ``max_objects``.
    """

    def __init__(self, images: str | Path, annotations: str | Path, *, image_size: int, max_objects: int = 32,
                 train: bool = False, seed: int = 0):
        self.images_dir, path = Path(images), Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            coco = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise IndexFormatError(path, err.lineno, f"not valid JSON ({err.msg})") from err
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise IndexFormatError(path, None, f"missing the '{key}' list of a COCO instances file")
        self.annotation_file = path
        self.category_ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        self.categories = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in coco["annotations"]:
            if not ann.get("iscrowd", 0):
                by_image.setdefault(ann["image_id"], []).append(ann)
        self.images = [img for img in coco["images"] if img["id"] in by_image]
        if not self.images:
            raise EmptyDatasetError(f"{path}: no image has a (non-crowd) annotation")
        self.annotations = by_image
        self.image_size, self.max_objects, self.train = image_size, max_objects, train
        self.random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        info = self.images[index]
        image = Image.open(self.images_dir / info["file_name"])
        sx, sy = self.image_size / image.width, self.image_size / image.height
        anns = self.annotations[info["id"]][: self.max_objects]
        size, count = self.image_size, len(anns)
        boxes = torch.zeros(self.max_objects, 4)
        classes = torch.zeros(self.max_objects, dtype=torch.long)
        masks = torch.zeros(self.max_objects, size, size, dtype=torch.uint8)
        for i, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[i] = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            classes[i] = self.label_of[ann["category_id"]]
            canvas = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(canvas)
            for polygon in ann.get("segmentation") or []:
                draw.polygon([(px * sx, py * sy) for px, py in zip(polygon[::2], polygon[1::2])], fill=1)
            masks[i] = torch.from_numpy(np.array(canvas, dtype=np.uint8))
        pixels = _image_tensor(image, size)
        if self.train and self.random.random() < 0.5:
            pixels, masks = pixels.flip(-1), masks.flip(-1)
            boxes[:count] = torch.stack([size - boxes[:count, 2], boxes[:count, 1],
                                         size - boxes[:count, 0], boxes[:count, 3]], dim=1)
        return {"pixel_values": pixels, "boxes": boxes, "classes": classes, "masks": masks,
                "num_objects": torch.tensor(count), "image_id": torch.tensor(info["id"]),
                "scale": torch.tensor([sx, sy])}


def unpad_targets(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Padded batch targets -> torchvision's list of per-image dicts (boxes, labels, masks)."""
    return [{"boxes": batch["boxes"][i, :n], "labels": batch["classes"][i, :n], "masks": batch["masks"][i, :n]}
            for i, n in enumerate(batch["num_objects"].tolist())]
