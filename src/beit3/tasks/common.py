"""What every fine-tuning task shares: options, the tokenizer, the model, per-sample processing.

A task's datasets are the raw index datasets of :mod:`beit3.data` with a per-sample transform
(:class:`SampleProcessor`): one raw sample (PIL images, strings, numbers) becomes one row of
fixed-shape tensors (text padded to ``max_text_len``), which the default collate stacks. Training
augmentation is :func:`beit3.data.transforms.train_image_transform`; evaluation uses the model's
deterministic :class:`~beit3.processing.Beit3ImageProcessor`.
"""
from __future__ import annotations

import copy
import difflib
from abc import ABC, abstractmethod
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from beit3.catalogue import TaskSpec
from beit3.config import Beit3Config
from beit3.data.datasets import vqa_targets
from beit3.data.transforms import is_deterministic, train_image_transform
from beit3.model_folder import resolve_tokenizer
from beit3.processing import Beit3ImageProcessor, Beit3Tokenizer
from beit3.training.config import RunConfig

COMMON_OPTIONS: dict[str, Any] = {
    "tokenizer": None,
    "train_index": None,
    "val_index": None,
    "horizontal_flip": True,
    "crop_scale": None,
}
"""Options every task accepts: ``tokenizer`` (a SentencePiece file or tokenizer folder; default:
the ``model.pretrained`` folder), ``train_index`` / ``val_index`` (file names under ``data.root``,
or lists of them, replacing the task's defaults; ``val_index: null`` keeps the default),
``horizontal_flip`` (random flips in training, the official default; off where labels say
"left"/"right") and ``crop_scale`` (area range of the training crop; null: the official one)."""


def parse_options(task: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``given``; an unknown key is an error naming the closest valid one."""
    known = {**COMMON_OPTIONS, **defaults}
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KeyError(f"unknown option task.options.{key} for task '{task}'{hint}; valid: {', '.join(sorted(known))}")
    return {**known, **given}


def index_files(root: str | None, names: str | Sequence[str]) -> list[Path]:
    """Index files under ``data.root`` (absolute names are kept); a missing one is an error that
    says how to make it."""
    if root is None:
        raise ValueError("data.root is not set: pass data.root=DIR, the folder `beit3 data build` wrote the "
                         "index files to (see docs/data.md)")
    names = [names] if isinstance(names, str) else list(names)
    paths = [Path(n) if Path(n).is_absolute() else Path(root) / n for n in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build the indexes with `beit3 data build <dataset> --root "
                                    f"<raw data> --out {root}`, or point data.root (or the task's index option) "
                                    "at the folder holding them (see docs/data.md)")
    return paths


def load_tokenizer(options: Mapping[str, Any], cfg: RunConfig) -> Beit3Tokenizer:
    """The tokenizer named by ``task.options.tokenizer``, else the one saved with the pretrained model."""
    return resolve_tokenizer(options.get("tokenizer"), also=[cfg.model.pretrained], hint=(
        "set task.options.tokenizer=PATH (`beit3 evaluate`: --tokenizer PATH) to the SentencePiece file (the "
        "official beit3.spm) or a tokenizer folder, or save one next to the pretrained model"))


def build_task_model(cls: type, cfg: RunConfig, tokenizer: Beit3Tokenizer | None, **head_args: Any) -> nn.Module:
    """The task model: from ``model.pretrained`` with a fresh head, or from the preset when it is unset.

    The pretrained backbone is resized to ``model.image_size`` and gets ``model.drop_path_rate``.
    The image mask token is frozen (see below). From scratch with a ``tokenizer`` (captioning,
    whose head scores every text id), the text vocabulary is the tokenizer's unless
    ``model.config.vocab_size`` says otherwise: as in pretraining, no rows for ids that never occur.
    """
    sizes = {"image_size": cfg.model.image_size, "drop_path_rate": cfg.model.drop_path_rate}
    if cfg.model.pretrained:
        model = cls.from_pretrained(cfg.model.pretrained, init_head=True, **sizes, **head_args)
    else:
        if cls.official_final_norm is not None:  # the task's choice, as from_pretrained(init_head=True)
            sizes["final_norm"] = cls.official_final_norm
        if tokenizer is not None and "vocab_size" not in cfg.model.config:
            sizes["vocab_size"] = tokenizer.vocab_size
        model = cls(Beit3Config.from_preset(cfg.model.preset, **{**cfg.model.config, **sizes}), **head_args)
    # The image mask token is for masked-image pretraining; no fine-tuning task uses it. Left
    # trainable, DDP (find_unused_parameters=False) would wait for its gradient forever: nothing is
    # all-reduced on the first step and the second step fails.
    for name, param in model.named_parameters():
        if name.endswith("vision_embed.mask_token"):
            param.requires_grad_(False)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {model.config.vocab_size} rows"
        )
    return model


def image_transform(spec: TaskSpec, cfg: RunConfig, train: bool, options: Mapping[str, Any],
                    **kwargs: Any) -> Callable[[Any], torch.Tensor]:
    """One image -> (3, S, S) at ``model.image_size``: the task's official training augmentation
    (with the common ``horizontal_flip`` / ``crop_scale`` options) or its evaluation pipeline."""
    if not train:
        return Beit3ImageProcessor(cfg.model.image_size, spec.image_mode).preprocess
    return train_image_transform(cfg.model.image_size, spec.image_mode, randaug=kwargs.pop("randaug", spec.randaug),
                                 horizontal_flip=bool(options.get("horizontal_flip", True)),
                                 crop_scale=options.get("crop_scale"), **kwargs)


class SampleProcessor:
    """One raw index sample -> one row of model inputs (tensors of fixed shape).

    ``image`` (and ``image2`` for pairs) -> ``pixel_values`` (3, S, S) or (2, 3, S, S); ``text``
    -> ``input_ids`` / ``attention_mask`` padded to ``max_text_len``; ``label`` -> ``labels``;
    VQA ``labels`` + ``scores`` -> dense soft ``labels`` over ``num_labels`` answers;
    ``image_id`` / ``qid`` / ``index`` -> integer tensors. ``text_transform`` may rewrite the
    encoded text (captioning masks it); other keys (caption references) are dropped: tasks read
    them from the index. ``image=None``: the samples already hold pixels (a dataset that caches
    the output of a deterministic image transform, see :meth:`IndexTask.dataset`).
    """

    def __init__(self, image: Callable[[Any], torch.Tensor] | None, tokenizer: Beit3Tokenizer | None = None,
                 max_text_len: int = 64, *, num_labels: int | None = None,
                 text_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        self.image, self.tokenizer, self.max_text_len = image, tokenizer, max_text_len
        self.num_labels, self.text_transform = num_labels, text_transform

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        row: dict[str, torch.Tensor] = {}
        pixels = self.image or (lambda given: given)
        if "image2" in sample:
            row["pixel_values"] = torch.stack([pixels(sample["image"]), pixels(sample["image2"])])
        else:
            row["pixel_values"] = pixels(sample["image"])
        if sample.get("text") is not None and self.tokenizer is not None:
            text = self.tokenizer([sample["text"]], max_length=self.max_text_len, padding="max_length", truncation=True, return_tensors="pt")
            if self.text_transform is not None:
                text = self.text_transform(text)
            row.update({k: v[0] for k, v in text.items()})
        if "label" in sample:
            row["labels"] = torch.tensor(sample["label"], dtype=torch.long)
        if "scores" in sample:
            if self.num_labels is None:
                raise ValueError("VQA samples need num_labels (the size of answer2label.txt)")
            row["labels"] = vqa_targets([sample["labels"]], [sample["scores"]], self.num_labels)[0]
        for key in ("image_id", "qid", "index"):
            if key in sample:
                row[key] = torch.tensor(sample[key], dtype=torch.long)
        return row


def index_rows(index_root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (index_root / name).read_text().splitlines() if line.strip()]


def majority_baseline(spec: TaskSpec, index_root: Path, name: str = "majority label") -> dict[str, Any]:
    """The most frequent training label, scored on the eval split (% of rows), as a baseline."""
    train = index_rows(index_root, spec.index_file("train"))
    val = index_rows(index_root, spec.index_file(spec.eval_split))
    top = Counter(r["label"] for r in train).most_common(1)[0][0]
    return {"name": name, "value": 100 * sum(r["label"] == top for r in val) / len(val)}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for methods other than ``forward``, e.g. ``generate``)."""
    return getattr(model, "module", model)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The image + text inputs every vision-language task model takes."""
    return {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"]}


def kept(batch: Mapping[str, Any]) -> torch.Tensor:
    """Boolean mask of the batch rows to count (the evaluation sampler's padding left out)."""
    return ~batch["is_padding"]


class TextCollate:
    """``default_collate``, then the text columns ``keys`` cut to the batch's longest text (the last
    column any ``attention_mask`` row attends), rounded up to a multiple of ``multiple``.

    The rows are padded on the right and the mask hides the padding, so the cut changes no real
    token's output: only how much padding the model computes (a VQA question of 11 ids padded to
    32 is two thirds padding). Batches without an ``attention_mask`` pass as they are.
    """

    def __init__(self, keys: Sequence[str] = ("input_ids", "attention_mask"), multiple: int = 8) -> None:
        self.keys, self.multiple = tuple(keys), int(multiple)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = default_collate(rows)
        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return batch
        used = mask.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        length = min(mask.shape[1], -(-length // self.multiple) * self.multiple)
        for key in self.keys:
            if key in batch:
                batch[key] = batch[key][:, :length]
        return batch


class IndexTask(ABC):
    """What the index-based tasks share: options parsed against ``defaults`` and checked
    against the spec's ``datasets``, the model from ``spec.model_class`` and ``head_args()``,
    the train / validation index files of the spec, and datasets whose samples go through
    :meth:`processor`. A subclass carries the ``spec``, its ``defaults`` and raw dataset class,
    and adds the loss and the per-batch statistics.
    """

    spec: TaskSpec
    defaults: Mapping[str, Any]
    raw_dataset: Callable[..., Dataset]
    collate_fn = staticmethod(default_collate)
    """Rows of fixed-shape tensors (see :class:`SampleProcessor`) stack as they are."""

    text_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    """The batch columns that run along the text (cut together under ``data.text_padding=longest``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = parse_options(self.spec.name, cfg.task.options, self.defaults)
        if cfg.data.text_padding == "longest" and self.collate_fn is default_collate:
            self.collate_fn = TextCollate(self.text_keys)
        if self.spec.datasets and self.options.get("dataset") not in self.spec.datasets:
            raise ValueError(f"task.options.dataset must be one of {sorted(self.spec.datasets)}, "
                             f"got {self.options.get('dataset')!r}")

    def head_args(self) -> dict[str, Any]:
        return {}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return build_task_model(self.spec.model_class, cfg, None, **self.head_args())

    def split_index(self, split: str) -> str:
        """The index file of ``split`` (for the ``dataset`` option)."""
        return self.spec.index_file(split, self.options.get("dataset"))

    def train_index(self) -> list[str]:
        return self.options["train_index"] or self.spec.train_index(self.options.get("dataset"))

    def val_index(self) -> str | list[str]:
        return self.options["val_index"] or self.split_index(self.spec.eval_split)

    @abstractmethod
    def processor(self, cfg: RunConfig, train: bool) -> Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]:
        """One raw sample -> one row of tensors, with training augmentation when ``train``."""

    def dataset_args(self) -> dict[str, Any]:
        """Extra arguments of the raw dataset: the label bounds its rows are checked against when built."""
        return {}

    def dataset(self, cfg: RunConfig, names: str | Sequence[str], train: bool) -> Dataset:
        """The raw dataset of ``names`` with the task's processor. A deterministic image transform
        moves into the dataset's image cache, which then keeps each image's pixels: decoded and
        resized once per run instead of once per epoch, with the same tensors."""
        processor, pixels = self.processor(cfg, train), None
        if isinstance(processor, SampleProcessor) and is_deterministic(processor.image) and cfg.data.image_cache_mb > 0:
            pixels, processor = processor.image, copy.copy(processor)
            processor.image = None
        return self.raw_dataset(index_files(cfg.data.root, names), transform=processor,
                                image_cache_mb=cfg.data.image_cache_mb, image_max_side=cfg.data.image_max_side,
                                pixels=pixels, **self.dataset_args())

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        return self.dataset(cfg, self.train_index(), True), self.dataset(cfg, self.val_index(), False)


class VisionLanguageTask(IndexTask):
    """Image + text index tasks (VQAv2, NLVR2, retrieval): the tokenizer of the run and the
    options ``randaug`` and ``max_text_len``."""

    def processor(self, cfg: RunConfig, train: bool) -> SampleProcessor:
        image = image_transform(self.spec, cfg, train, self.options, randaug=bool(self.options["randaug"]))
        return SampleProcessor(image, load_tokenizer(self.options, cfg), int(self.options["max_text_len"]),
                               **self.processor_args())

    def processor_args(self) -> dict[str, Any]:
        return {}

