"""Map-style datasets over the index files, returning raw samples, and a collator that makes batches.

Samples are dicts of PIL images, raw strings and plain numbers, plus the ``index`` they were asked
for. Tokenising and resizing happen in the processor given to ``Collator`` (or a ``transform``
given to the dataset), so a dataset does not depend on a tokenizer and one index serves every
model size.

A corrupt or missing image does not stop an epoch: the sample is replaced by the next readable one,
a warning names the file, and ``skipped`` counts it (per process: each data-loader worker keeps its
own count). ``strict=True`` raises instead, for checking a new dataset. That substitution keeps
training batches full; evaluation must not score a sample twice, so ``bad_rows`` records each
unreadable row (and why), and ``beit3 evaluate`` leaves the substitutes out of the metric and
reports how many were skipped.

Decoded images are kept in memory (``image_cache_mb``, 1 GiB per process by default), so a small
dataset is decoded once, not once per epoch: the cache fills as images are first read and stops
growing at its budget (random access makes eviction useless). Data-loader workers are started anew
each epoch, so the cache pays with ``num_workers=0`` -- the right setting for small datasets.
``image_max_side`` shrinks larger images as they are read (before the cache), for folders of
photos much bigger than the model's input. When the image transform is deterministic (evaluation,
or training recipes without random crops, flips or RandAugment: see
:func:`beit3.data.transforms.is_deterministic`), the tasks give it to the dataset as ``pixels``
and the cache keeps its output, the model's pixels, instead: each image is then decoded and
resized once per run, not once per epoch.

Labels are checked when a dataset is built (class ids against ``num_classes``, VQA answer labels
against ``num_labels``, NLVR2 truth values 0 / 1): a wrong one is an error naming the index file,
its line and the value, not a crash at the first step or a silently wrong score.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from beit3.data.index import DataError, EmptyDatasetError, IndexFormatError, read_jsonl, resolve_image_path
from beit3.processing import image as processing_image

Sample = dict[str, Any]
Transform = Callable[[Sample], Any]
T = TypeVar("T")


class BadImageError(DataError):
    """An image file that is missing or cannot be decoded."""


class BadSampleWarning(UserWarning):
    """A sample was skipped because its image could not be read."""


def merge_skip_counts(parts: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """Sum counts of skipped samples given as source -> shard -> count (of processes, of streams)."""
    merged: dict[str, dict[str, int]] = {}
    for part in parts:
        for source, shards in part.items():
            into = merged.setdefault(source, {})
            for shard, count in shards.items():
                into[shard] = into.get(shard, 0) + int(count)
    return merged


def load_image(path: str | os.PathLike) -> Image.Image:
    """:func:`beit3.processing.load_image` for data files (RGB, EXIF orientation applied, alpha
    composited onto white, so training sees what inference sees); a missing or broken file raises
    ``BadImageError`` naming it, which the datasets and streams skip."""
    try:
        return processing_image.load_image(path)
    except (ValueError, OSError) as err:  # OSError: missing or unreadable (permissions) files
        message = str(err)
        raise BadImageError(message if str(path) in message else f"cannot read image '{path}': {message}") from None


class ImageCache:
    """Decoded RGB images by path, up to ``max_bytes`` of pixels; ``max_side`` shrinks larger images
    (aspect kept, bicubic) as they are read. ``get`` returns a copy, so a transform cannot change a
    cached image. ``hits`` / ``misses`` / ``used_bytes`` tell how it does.

    ``pixels``: a deterministic image -> tensor transform applied once to each image read; the
    cache then holds (and ``get`` returns) its tensors, shared between calls: treat them as read-only.
    """

    def __init__(self, max_bytes: int, max_side: int | None = None,
                 pixels: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"the image cache budget must be >= 0 bytes, got {max_bytes}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"image_max_side must be a positive number of pixels, got {max_side}")
        self.max_bytes, self.max_side, self.pixels = int(max_bytes), max_side, pixels
        self.used_bytes = self.hits = self.misses = 0
        self._images: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._images)

    def cached(self, key: Hashable, load: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """Any value under ``key``: the stored one, else ``load()``, kept while ``nbytes`` of it fits
        the budget. Returned as stored, never copied: callers treat it as read-only (the
        pretraining dataset keeps its decoded samples here)."""
        if key in self._images:
            self.hits += 1
            return self._images[key]
        self.misses += 1
        value = load()
        size = nbytes(value)
        if self.used_bytes + size <= self.max_bytes:
            self._images[key] = value
            self.used_bytes += size
        return value

    def get(self, path: str | os.PathLike) -> Image.Image | torch.Tensor:
        key = os.fspath(path)
        cached = self._images.get(key)
        if cached is not None:
            self.hits += 1
            return cached if self.pixels is not None else cached.copy()
        self.misses += 1
        image = load_image(path)
        if self.max_side is not None and max(image.size) > self.max_side:
            scale = self.max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        if self.pixels is not None:
            tensor = self.pixels(image)
            if self.used_bytes + tensor.nbytes <= self.max_bytes:
                self._images[key] = tensor
                self.used_bytes += tensor.nbytes
            return tensor
        nbytes = image.width * image.height * len(image.getbands())
        if self.used_bytes + nbytes <= self.max_bytes:
            self._images[key] = image
            self.used_bytes += nbytes
            return image.copy()
        return image


DEFAULT_IMAGE_CACHE_MB = 1024


class IndexDataset(Dataset):
    """Rows of one or more index files (e.g. VQA train + trainable_val); subclasses turn a row into a sample."""

    required: tuple[str, ...] = ("image_path",)

    def __init__(
        self,
        index_files: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        transform: Transform | None = None,
        strict: bool = False,
        image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
        image_max_side: int | None = None,
        pixels: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.images = ImageCache(int(image_cache_mb * 2**20), image_max_side, pixels)
        """Decoded images of this process (see the module notes); ``image_cache_mb=0`` turns it off.
        With ``pixels`` (a deterministic image transform) samples hold its tensors instead of images."""
        files = [index_files] if isinstance(index_files, (str, os.PathLike)) else list(index_files)
        self.rows: list[tuple[Path, dict[str, Any]]] = []
        for file in files:
            rows = read_jsonl(file, self.required)
            for position, row in enumerate(rows):
                problem = self.problem(row)
                if problem is not None:
                    raise IndexFormatError(file, _line_of(file, position), problem)
            self.rows += [(Path(file), row) for row in rows]
        if not self.rows:
            raise EmptyDatasetError(f"no sample in {', '.join(map(str, files))}")
        self.transform = transform
        self.strict = strict
        self.skipped = 0
        self.bad_rows: dict[int, str] = {}
        """Rows whose image could not be read (row number -> why), as they are met."""

    def problem(self, row: dict[str, Any]) -> str | None:
        """What makes a row unusable (a label out of range), or None; checked when the dataset is built."""
        return None

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index_file: Path, row: dict[str, Any], key: str = "image_path") -> Image.Image | torch.Tensor:
        """The image a row points at, resolved relative to its index file (its ``pixels`` when given)."""
        return self.images.get(resolve_image_path(index_file, row[key]))

    def sample(self, index_file: Path, row: dict[str, Any]) -> Sample:
        """Build the raw sample of one row; raises ``BadImageError`` for an unreadable image."""
        return {"image": self.image(index_file, row)}

    def __getitem__(self, index: int) -> Any:
        """The sample of row ``index`` with ``"index": index`` added, then ``transform``-ed.

        A sample that falls forward past unreadable images keeps the ``index`` asked for, so the
        indexes of an epoch stay distinct.
        """
        # Fall forward to the next row rather than return None, so every batch keeps its size.
        for offset in range(len(self.rows)):
            index_file, row = self.rows[(index + offset) % len(self.rows)]
            try:
                sample = self.sample(index_file, row)
            except BadImageError as err:
                if self.strict:
                    raise
                self.skipped += 1
                self.bad_rows[(index + offset) % len(self.rows)] = str(err)
                warnings.warn(f"skipping sample: {err}", BadSampleWarning, stacklevel=2)
                continue
            sample["index"] = int(index)
            return self.transform(sample) if self.transform else sample
        raise DataError("no readable image in the whole dataset")


class ImageTextDataset(IndexDataset):
    """Retrieval and captioning rows: an image, its caption (None for captioning val/test) and ids."""

    required = ("image_path", "text", "image_id")

    def sample(self, index_file: Path, row: dict[str, Any]) -> Sample:
        sample = {"image": self.image(index_file, row), "text": row["text"], "image_id": row["image_id"]}
        if "references" in row:
            sample["references"] = row["references"]
        return sample


def _line_of(path: str | os.PathLike, position: int) -> int:
    """The line number of the ``position``-th row (0-based) of an index file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        seen = -1
        for line_no, line in enumerate(handle, start=1):
            seen += bool(line.strip())
            if seen == position:
                return line_no
    return position + 1


def _label_problem(value: Any, count: int, what: str, fix: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} {value!r} is not a whole number (expected 0..{count - 1})"
    if not 0 <= value < count:
        return f"{what} {value} is outside 0..{count - 1} ({count} {fix}"
    return None


class VQADataset(IndexDataset):
    """VQA rows: image, question, ``qid`` and, outside the test splits, answer ``labels`` with soft ``scores``.

    With ``num_labels`` (the size of ``answer2label.txt``), every answer label is checked to be
    below it when the dataset is built."""

    required = ("image_path", "text", "qid")

    def __init__(self, index_files: str | os.PathLike | Sequence[str | os.PathLike], *,
                 num_labels: int | None = None, **kwargs: Any) -> None:
        self.num_labels = num_labels
        super().__init__(index_files, **kwargs)

    def problem(self, row: dict[str, Any]) -> str | None:
        if "labels" not in row:
            return None
        labels, scores = row["labels"], row.get("scores")
        if not isinstance(labels, list) or not isinstance(scores, list) or len(labels) != len(scores):
            return "labels and scores must be lists of the same length"
        if self.num_labels is None:
            return None
        for label in labels:
            problem = _label_problem(label, self.num_labels, "answer label",
                                     "answers in answer2label.txt; rebuild the index with that file)")
            if problem:
                return problem
        return None

    def sample(self, index_file: Path, row: dict[str, Any]) -> Sample:
        sample = {"image": self.image(index_file, row), "text": row["text"], "qid": row["qid"]}
        if "labels" in row:
            sample.update(labels=row["labels"], scores=row["scores"])
        return sample


class NLVR2Dataset(IndexDataset):
    """NLVR2 rows: left and right images, the statement and its truth ``label`` (1 = true)."""

    required = ("image_path", "image2_path", "text", "label")

    def problem(self, row: dict[str, Any]) -> str | None:
        if row["label"] in (0, 1):  # True / False too
            return None
        return f"label {row['label']!r} is not 0 (false) or 1 (true)"

    def sample(self, index_file: Path, row: dict[str, Any]) -> Sample:
        return {"image": self.image(index_file, row), "image2": self.image(index_file, row, "image2_path"),
                "text": row["text"], "label": row["label"]}


class ImageClassificationDataset(IndexDataset):
    """Class-folder rows: an image and its integer ``label`` (checked against ``num_classes`` when given)."""

    required = ("image_path", "label")

    def __init__(self, index_files: str | os.PathLike | Sequence[str | os.PathLike], *,
                 num_classes: int | None = None, **kwargs: Any) -> None:
        self.num_classes = num_classes
        super().__init__(index_files, **kwargs)

    def problem(self, row: dict[str, Any]) -> str | None:
        if self.num_classes is None:
            return None
        return _label_problem(row["label"], self.num_classes, "label",
                              "classes, task.options.num_classes)")

    def sample(self, index_file: Path, row: dict[str, Any]) -> Sample:
        return {"image": self.image(index_file, row), "label": row["label"]}


def vqa_targets(labels: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], num_labels: int) -> torch.Tensor:
    """Dense soft-score targets, shape (B, num_labels), for binary cross-entropy over the answer vocabulary."""
    targets = torch.zeros(len(labels), num_labels)
    for row, (row_labels, row_scores) in enumerate(zip(labels, scores)):
        targets[row, list(row_labels)] = torch.tensor(list(row_scores), dtype=torch.float)
    return targets


class Collator:
    """Turn raw samples into a model batch with a processor-like callable.

    ``processor(images=[...], text=[...], **processor_kwargs)`` (either of images/text may be absent)
    must return a mapping of tensors such as ``pixel_values``, ``input_ids`` and ``attention_mask``.
    ``beit3.processing.Beit3Processor`` fits as it is (e.g. ``Collator(processor, max_length=32)``):
    it knows no task, what it returns follows from the inputs. NLVR2 images go to it as
    (left, right) pairs, which it stacks to (B, 2, C, H, W).
    Added keys: ``labels`` (class ids, NLVR2 truth, or dense VQA soft scores, which need
    ``num_labels``), ``image_id``/``qid``/``index`` tensors and ``references`` lists.
    """

    def __init__(self, processor: Callable[..., Mapping[str, Any]], *, num_labels: int | None = None,
                 **processor_kwargs: Any) -> None:
        self.processor = processor
        self.num_labels = num_labels
        self.processor_kwargs = processor_kwargs

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        first = samples[0]
        inputs: dict[str, Any] = dict(self.processor_kwargs)
        if "image2" in first:
            inputs["images"] = [(sample["image"], sample["image2"]) for sample in samples]
        elif "image" in first:
            inputs["images"] = [sample["image"] for sample in samples]
        if first.get("text") is not None:
            inputs["text"] = [sample["text"] for sample in samples]
        batch = dict(self.processor(**inputs))
        if "label" in first:
            batch["labels"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
        if "scores" in first:
            if self.num_labels is None:
                raise ValueError("VQA batches need num_labels (the size of answer2label.txt)")
            batch["labels"] = vqa_targets([s["labels"] for s in samples], [s["scores"] for s in samples], self.num_labels)
        for key in ("image_id", "qid", "index"):
            if key in first:
                batch[key] = torch.tensor([sample[key] for sample in samples], dtype=torch.long)
        if "references" in first:
            batch["references"] = [sample["references"] for sample in samples]
        return batch
