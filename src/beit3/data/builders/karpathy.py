"""COCO and Flickr30k captions with the Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``).

Layout read (the official one)::

    ROOT/dataset_coco.json           ROOT/<filepath>/<filename>   (train2014/, val2014/)
    ROOT/dataset_flickr30k.json      ROOT/flickr30k-images/<filename>

The Karpathy file lists images, each with ``split`` (train, restval, val, test) and ``sentences``
holding ``raw`` captions. As in the release, training uses train + restval.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from beit3.data.builders.common import BuildReport, ImageChecker, finish, image_field, progress, require
from beit3.data.index import IndexFormatError, read_json

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _load_images(annotation: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    data = read_json(annotation)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IndexFormatError(annotation, None, 'expected an object with an "images" list (Karpathy format)')
    for number, image in enumerate(data["images"]):
        require(image, keys, annotation, f"images[{number}]")
        for sent_no, sentence in enumerate(image["sentences"]):
            require(sentence, ("raw",), annotation, f"images[{number}].sentences[{sent_no}]")
    return data["images"]


def _captions(image: dict[str, Any], report: BuildReport, name: str) -> list[str]:
    captions = []
    for sentence in image["sentences"]:
        raw = sentence["raw"].strip() if isinstance(sentence["raw"], str) else ""
        if raw:
            captions.append(raw)
        else:
            report.problem("empty caption", name)
    return captions


def build_retrieval(
    root: str | Path,
    out: str | Path,
    *,
    dataset: str = "coco",
    annotation: str | Path | None = None,
    strict: bool = False,
    verify_images: bool = False,
) -> BuildReport:
    """Write ``<prefix>.{train,val,test}.jsonl``: one row per caption with ``image_path``, ``text``, ``image_id``.

    ``image_id`` numbers the images of a split from 0, so all captions of one image share it; that is
    what recall@k groups by. ``dataset`` is "coco" (prefix ``coco_retrieval``) or "flickr30k".
    """
    root, out = Path(root), Path(out)
    prefix = {"coco": "coco_retrieval", "flickr30k": "flickr30k"}[dataset]
    annotation = Path(annotation) if annotation else root / f"dataset_{dataset}.json"
    folder = (lambda image: root / image["filepath"]) if dataset == "coco" else (lambda image: root / "flickr30k-images")
    keys = ("filepath", "filename", "split", "sentences") if dataset == "coco" else ("filename", "split", "sentences")
    report = BuildReport(prefix, out)
    checker = ImageChecker(report, verify=verify_images)
    images = _load_images(annotation, keys)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, members in SPLITS.items():
        rows: list[dict[str, Any]] = []
        image_id = 0
        for image in progress(images, total=len(images), desc=f"{prefix}: {split} images"):
            if image["split"] not in members:
                continue
            path = folder(image) / image["filename"]
            captions = _captions(image, report, str(path))
            if not checker.ok(path) or not captions:
                continue
            rows += [{"image_path": image_field(path, out), "text": text, "image_id": image_id} for text in captions]
            image_id += 1
        splits[f"{prefix}.{split}.jsonl"] = rows
    unknown = sorted({image["split"] for image in images} - {s for members in SPLITS.values() for s in members})
    if unknown:
        report.notes.append(f"images with split {unknown} ignored")
    return finish(report, splits, strict=strict)


def build_captioning(
    root: str | Path,
    out: str | Path,
    *,
    annotation: str | Path | None = None,
    strict: bool = False,
    verify_images: bool = False,
) -> BuildReport:
    """Write ``coco_captioning.{train,val,test}.jsonl`` from ``dataset_coco.json``.

    Train rows hold one caption each. Val/test rows hold one image each with ``text: null`` (the model
    generates it) and ``references``, the ground-truth captions that CIDEr/BLEU compare against.
    ``image_id`` is the COCO id, which the official evaluation files use.
    """
    root, out = Path(root), Path(out)
    annotation = Path(annotation) if annotation else root / "dataset_coco.json"
    report = BuildReport("coco_captioning", out)
    checker = ImageChecker(report, verify=verify_images)
    images = _load_images(annotation, ("filepath", "filename", "split", "sentences", "cocoid"))
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, members in SPLITS.items():
        rows: list[dict[str, Any]] = []
        for image in progress(images, total=len(images), desc=f"coco_captioning: {split} images"):
            if image["split"] not in members:
                continue
            path = root / image["filepath"] / image["filename"]
            captions = _captions(image, report, str(path))
            if not checker.ok(path) or not captions:
                continue
            where = image_field(path, out)
            if split == "train":
                rows += [{"image_path": where, "text": text, "image_id": image["cocoid"]} for text in captions]
            else:
                rows.append({"image_path": where, "text": None, "image_id": image["cocoid"], "references": captions})
        splits[f"coco_captioning.{split}.jsonl"] = rows
    return finish(report, splits, strict=strict)
