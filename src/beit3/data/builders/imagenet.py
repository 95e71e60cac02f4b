"""Image classification from ImageNet-style class folders.

Layout read::

    ROOT/train/<class name>/<image>     ROOT/val/<class name>/<image>

Labels are indexes into the sorted train folder names, as in torchvision's ``ImageFolder`` and the
release. Written: ``imagenet.{train,val}.index.jsonl`` (``image_path``, ``label``) and
``imagenet.classes.txt`` (class name of label i on line i).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from beit3.data.builders.common import BuildReport, ImageChecker, finish, image_field, progress
from beit3.data.files import is_image_name


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir())


def build_imagenet(root: str | Path, out: str | Path, *, strict: bool = False, verify_images: bool = False) -> BuildReport:
    """Build the classification indexes; files that are not images are counted, val classes unknown to train reported."""
    root, out = Path(root), Path(out)
    report = BuildReport("imagenet", out)
    checker = ImageChecker(report, verify=verify_images)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'} is not a folder of class folders")
    classes = [path.name for path in _class_dirs(root / "train")]
    label_of = {name: label for label, name in enumerate(classes)}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "val"):
        rows: list[dict[str, Any]] = []
        if not (root / split).is_dir():
            report.notes.append(f"{root / split} not found, {split} split skipped")
            continue
        for class_dir in progress(_class_dirs(root / split), total=None, desc=f"imagenet: {split} classes"):
            if class_dir.name not in label_of:
                report.problem("class folder not in train", str(class_dir))
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.is_dir():
                    continue
                if not is_image_name(path):
                    report.problem("not an image file", str(path))
                    continue
                if checker.ok(path):
                    rows.append({"image_path": image_field(path, out), "label": label_of[class_dir.name]})
        splits[f"imagenet.{split}.index.jsonl"] = rows
    finish(report, splits, strict=strict, extra={"imagenet.classes.txt": "".join(name + "\n" for name in classes)})
    report.notes.append(f"{len(classes)} classes listed in imagenet.classes.txt")
    return report
