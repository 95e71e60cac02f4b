"""NLVR2 from the official JSON-lines files (one statement about a left/right image pair per line).

Layout read (the official one)::

    ANNOTATIONS/{train,dev,test1}.json       default ANNOTATIONS = ROOT/nlvr2/data
    ROOT/images/train/<directory>/<pair>-img0.png, -img1.png
    ROOT/dev/<pair>-img0.png ...            ROOT/test1/<pair>-img0.png ...

``<pair>`` is the ``identifier`` without its last dash segment ("train-10171-0-0" -> "train-10171-0").
Written: ``nlvr2.{train,dev,test-P}.index.jsonl`` with ``image_path``, ``image2_path``, ``text``,
``label`` (1 for "True") and ``identifier``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from beit3.data.builders.common import BuildReport, ImageChecker, finish, image_field, progress
from beit3.data.index import IndexFormatError

SPLITS = {"train": "train", "dev": "dev", "test-P": "test1"}
LABELS = {"True": 1, "False": 0}


def _pair_folder(root: Path, split_file: str, record: dict[str, Any]) -> Path:
    if split_file == "train":
        return root / "images" / "train" / str(record["directory"])
    return root / split_file


def build_nlvr2(
    root: str | Path,
    out: str | Path,
    *,
    annotations: str | Path | None = None,
    strict: bool = False,
    verify_images: bool = False,
) -> BuildReport:
    """Build the NLVR2 indexes; a line that is not JSON or lacks a field is reported with file and line."""
    root, out = Path(root), Path(out)
    ann_dir = Path(annotations) if annotations else root / "nlvr2" / "data"
    report = BuildReport("nlvr2", out)
    checker = ImageChecker(report, verify=verify_images)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, split_file in SPLITS.items():
        path = ann_dir / f"{split_file}.json"
        if not path.is_file():
            report.notes.append(f"{path} not found, {split} split skipped")
            continue
        rows = []
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
        for line_no, line in progress(enumerate(lines, start=1), total=len(lines), desc=f"nlvr2: {split}"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise IndexFormatError(path, line_no, f"not valid JSON ({err.msg} at column {err.colno})") from None
            needed = ("identifier", "sentence", "label") + (("directory",) if split_file == "train" else ())
            missing = [key for key in needed if key not in record]
            if missing:
                raise IndexFormatError(path, line_no, f"missing field(s) {', '.join(missing)}")
            if record["label"] not in LABELS:
                raise IndexFormatError(path, line_no, f'label must be "True" or "False", got {record["label"]!r}')
            text = record["sentence"].strip() if isinstance(record["sentence"], str) else ""
            if not text:
                report.problem("empty statement", f"{path}:{line_no}")
                continue
            pair = record["identifier"].rsplit("-", 1)[0]
            folder = _pair_folder(root, split_file, record)
            left, right = folder / f"{pair}-img0.png", folder / f"{pair}-img1.png"
            left_ok, right_ok = checker.ok(left), checker.ok(right)  # check both so both get reported
            if not (left_ok and right_ok):
                continue
            rows.append({"image_path": image_field(left, out), "image2_path": image_field(right, out),
                         "text": text, "label": LABELS[record["label"]], "identifier": record["identifier"]})
        splits[f"nlvr2.{split}.index.jsonl"] = rows
    return finish(report, splits, strict=strict)
