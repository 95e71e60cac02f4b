"""VQAv2 from the official question and annotation files.

Layout read (the official one; test files are optional)::

    ROOT/vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    ROOT/vqa/v2_mscoco_{train2014,val2014}_annotations.json
    ROOT/{train2014,val2014,test2015}/COCO_<subtype>_<image_id:012d>.jpg

Written: ``vqa.{train,val,trainable_val,rest_val,test,test-dev}.jsonl`` and ``answer2label.txt``.
Rows of the labelled splits keep, besides the soft-score targets (``labels``, ``scores``), the ten
annotator answers as typed (``raw_answers``) and the ``answer_type`` (yes/no, number, other) of the
annotation file: the official VQA accuracy and its per-type breakdown are computed from them.
Fine-tuning trains on train + trainable_val and validates on rest_val: ``rest_val_images`` val
images (1000, following ViLT) drawn with a seeded shuffle, so the split is the same on every machine
(the release shuffles without a seed).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from beit3.data.builders.common import BuildReport, ImageChecker, finish, image_field, progress, require
from beit3.data.index import DataError, IndexFormatError, read_json, read_jsonl
from beit3.data.vqa_answers import answer_targets, build_answer_vocab

QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
ANNOTATIONS = "v2_mscoco_{}_annotations.json"
# split name in our files -> (COCO subtype of the question file, image folder)
SUBSETS = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
           "test": ("test2015", "test2015"), "test-dev": ("test-dev2015", "test2015")}


def _questions(path: Path) -> list[dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise IndexFormatError(path, None, 'expected an object with a "questions" list (VQAv2 format)')
    for number, question in enumerate(data["questions"]):
        require(question, ("image_id", "question", "question_id"), path, f"questions[{number}]")
    return data["questions"]


def _annotations(path: Path) -> dict[int, dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise IndexFormatError(path, None, 'expected an object with an "annotations" list (VQAv2 format)')
    by_question = {}
    for number, annotation in enumerate(data["annotations"]):
        require(annotation, ("question_id", "multiple_choice_answer", "answers"), path, f"annotations[{number}]")
        by_question[annotation["question_id"]] = annotation
    return by_question


def build_vqa(
    root: str | Path,
    out: str | Path,
    *,
    annotations: str | Path | None = None,
    min_answer_count: int = 9,
    rest_val_images: int = 1000,
    seed: int = 0,
    legacy: bool = False,
    strict: bool = False,
    verify_images: bool = False,
) -> BuildReport:
    """Build the VQAv2 indexes; see the module docstring for files and splits.

    ``legacy`` reproduces the released normalisation bugs and raw-answer matching (see
    ``beit3.data.vqa_answers``) for a byte-identical ``answer2label.txt``.
    """
    root, out = Path(root), Path(out)
    ann_dir = Path(annotations) if annotations else root / "vqa"
    report = BuildReport("vqav2", out)
    checker = ImageChecker(report, verify=verify_images)

    labelled = {split: _annotations(ann_dir / ANNOTATIONS.format(SUBSETS[split][0])) for split in ("train", "val")}
    answers = [a["multiple_choice_answer"] for split in ("train", "val") for a in labelled[split].values()]
    vocab = build_answer_vocab(answers, min_count=min_answer_count, legacy=legacy)
    if not vocab:
        raise DataError(f"no answer is seen {min_answer_count} times or more in {ann_dir}; lower min_answer_count")
    answer2label = {answer: label for label, answer in enumerate(vocab)}
    report.notes.append(f"{len(vocab)} answers seen >= {min_answer_count} times (normalised{', legacy' if legacy else ''})")

    rows_by_split: dict[str, list[dict[str, Any]]] = {}
    for split, (subtype, folder) in SUBSETS.items():
        path = ann_dir / QUESTIONS.format(subtype)
        if split.startswith("test") and not path.is_file():
            report.notes.append(f"{path.name} not found, {split} split skipped")
            continue
        rows, unanswerable = [], 0
        questions = _questions(path)
        for question in progress(questions, total=len(questions), desc=f"vqav2: {split} questions"):
            image = root / folder / f"COCO_{folder}_{question['image_id']:012d}.jpg"
            text = question["question"].strip() if isinstance(question["question"], str) else ""
            if not text:
                report.problem("empty question", f"{path.name} question_id {question['question_id']}")
                continue
            if not checker.ok(image):
                continue
            row = {"image_path": image_field(image, out), "text": text,
                   "qid": question["question_id"], "image_id": question["image_id"]}
            if split in labelled:
                annotation = labelled[split].get(question["question_id"])
                if annotation is None:
                    report.problem("question without annotation", f"{path.name} question_id {question['question_id']}")
                    continue
                raw_answers = [a["answer"] for a in annotation["answers"]]
                labels, scores = answer_targets(raw_answers, answer2label, legacy=legacy)
                if not labels:
                    unanswerable += 1
                    continue
                row.update(labels=labels, scores=scores, raw_answers=raw_answers)
                if "answer_type" in annotation:
                    row["answer_type"] = annotation["answer_type"]
            rows.append(row)
        if unanswerable:
            report.notes.append(f"{unanswerable} {split} questions dropped: no annotator answer in the vocabulary")
        rows_by_split[split] = rows

    val_images = sorted({row["image_id"] for row in rows_by_split["val"]})
    if len(val_images) <= rest_val_images:
        raise DataError(f"only {len(val_images)} val images, cannot hold out {rest_val_images} for rest_val; "
                        "pass a smaller rest_val_images (--rest-val-images)")
    random.Random(seed).shuffle(val_images)
    held_out = set(val_images[:rest_val_images])
    report.notes.append(f"rest_val = {rest_val_images} val images chosen with seed {seed}")

    splits = {f"vqa.{split}.jsonl": rows for split, rows in rows_by_split.items()}
    splits["vqa.trainable_val.jsonl"] = [row for row in rows_by_split["val"] if row["image_id"] not in held_out]
    splits["vqa.rest_val.jsonl"] = [row for row in rows_by_split["val"] if row["image_id"] in held_out]
    answer_file = "".join(json.dumps({"answer": answer, "label": label}) + "\n" for answer, label in answer2label.items())
    finish(report, splits, strict=strict, extra={"answer2label.txt": answer_file})
    report.notes.append(f"answer2label.txt: {len(answer2label)} answers")
    return report


def read_answer2label(path: str | Path) -> dict[str, int]:
    """Load ``answer2label.txt`` (one ``{"answer": ..., "label": ...}`` object per line)."""
    return {row["answer"]: int(row["label"]) for row in read_jsonl(path, required=("answer", "label"))}
