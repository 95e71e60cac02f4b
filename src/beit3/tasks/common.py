"""What every fine-tuning task shares: options, the tokenizer, the model, per-sample processing.

The engine batches samples with the default collate, so each task's dataset returns one sample
of fixed-shape tensors. :class:`ProcessedDataset` gets there by running the ``beit3.data``
collator on a batch of one and taking the row back out, so the processing is exactly the one
``Collator`` documents (text padded to ``max_text_len``).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from beit3.config import Beit3Config
from beit3.data import Collator
from beit3.processing import Beit3ImageProcessor, Beit3Processor, Beit3Tokenizer
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
    if options.get("tokenizer"):
        return Beit3Tokenizer.from_pretrained(options["tokenizer"])
    pretrained = cfg.model.pretrained
    if pretrained and Path(pretrained).is_dir():
        try:
            return Beit3Tokenizer.from_pretrained(pretrained)
        except FileNotFoundError:
            pass
    raise ValueError(
        "no tokenizer: set task.options.tokenizer=PATH (`beit3 evaluate`: --tokenizer PATH) to the SentencePiece "
        "file (the official beit3.spm) or a tokenizer folder, or save one next to the pretrained model"
    )


def build_task_model(cls: type, cfg: RunConfig, tokenizer: Beit3Tokenizer | None, **head_args: Any) -> nn.Module:
    """The task model: from ``model.pretrained`` with a fresh head, or from the preset when it is unset.

    The pretrained backbone is resized to ``model.image_size`` and gets ``model.drop_path_rate``.
    The image mask token is frozen (see below).
    """
    sizes = {"image_size": cfg.model.image_size, "drop_path_rate": cfg.model.drop_path_rate}
    if cfg.model.pretrained:
        model = cls.from_pretrained(cfg.model.pretrained, init_head=True, **sizes, **head_args)
    else:
        if cls.official_final_norm is not None:  # the task's choice, as from_pretrained(init_head=True)
            sizes["final_norm"] = cls.official_final_norm
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


def image_processor(task: str, cfg: RunConfig, train: bool, options: Mapping[str, Any],
                    **kwargs: Any) -> Beit3ImageProcessor:
    """The official pipeline of ``task`` at ``model.image_size`` (training augmentation when
    ``train``), with the common ``horizontal_flip`` / ``crop_scale`` options applied."""
    base = Beit3ImageProcessor.for_task(task, cfg.model.image_size, train=train)
    return Beit3ImageProcessor(base.image_size, base.mode, train, randaug=kwargs.pop("randaug", base.randaug),
                               horizontal_flip=bool(options.get("horizontal_flip", True)),
                               crop_scale=options.get("crop_scale"), **kwargs)


class ProcessedDataset(Dataset):
    """Raw samples -> one processed sample of tensors (plus ``index``, the row number).

    ``collate`` is a ``beit3.data.Collator``; it runs on a batch of one and each tensor loses its
    batch dimension. Non-tensor values (caption references) are dropped: the default collate
    cannot batch them, and tasks read them from the index instead.
    """

    def __init__(self, raw: Dataset, collate: Callable[[list], dict[str, Any]]) -> None:
        self.raw = raw
        self.collate = collate

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.collate([self.raw[index]])
        sample = {k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        sample["index"] = torch.tensor(index)
        return sample


def make_collator(tokenizer: Beit3Tokenizer, images: Beit3ImageProcessor, max_text_len: int, **kwargs: Any) -> Collator:
    return Collator(Beit3Processor(tokenizer, images, max_length=max_text_len), **kwargs)


def count_tokens(batch: Mapping[str, Any], patch_size: int) -> int:
    """Patches (+ CLS) of every image plus the real text tokens of a batch."""
    tokens = 0
    pixels = batch.get("pixel_values")
    if pixels is not None:
        images = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)
        tokens += images * ((pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size) + 1)
    mask = batch.get("attention_mask")
    if mask is not None:
        tokens += int(mask.sum().item()) * (pixels.shape[1] if pixels is not None and pixels.dim() == 5 else 1)
    return tokens


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for methods other than ``forward``, e.g. ``generate``)."""
    return getattr(model, "module", model)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The image + text inputs every vision-language task model takes."""
    return {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"]}


class VisionLanguageTask:
    """What the index-based image + text tasks (VQAv2, NLVR2, retrieval) share: options parsed
    against ``defaults``, the model from ``model_class`` and ``head_args()``, train / validation
    datasets read from index files through the task's processor, and token counting.

    A subclass names itself (``name``: the task, its image pipeline and its collate mode), its
    model and raw dataset classes, and its default index files (``train_index()`` and
    ``val_index()``); it adds the loss and the metric.
    """

    name: str
    defaults: Mapping[str, Any]
    model_class: type
    raw_dataset: Callable[[list[Path]], Dataset]
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = parse_options(self.name, cfg.task.options, self.defaults)
        self.patch_size = 16  # the model's, once build_model has run

    def head_args(self) -> dict[str, Any]:
        return {}

    def collate_args(self) -> dict[str, Any]:
        return {}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = build_task_model(self.model_class, cfg, None, **self.head_args())
        self.patch_size = model.config.patch_size
        return model

    def dataset(self, cfg: RunConfig, names: str | Sequence[str], train: bool) -> Dataset:
        tokenizer = load_tokenizer(self.options, cfg)
        images = image_processor(self.name, cfg, train, self.options, randaug=bool(self.options["randaug"]))
        collate = make_collator(tokenizer, images, int(self.options["max_text_len"]), task=self.name,
                                **self.collate_args())
        return ProcessedDataset(self.raw_dataset(index_files(cfg.data.root, names)), collate)

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o = self.options
        return (self.dataset(cfg, o["train_index"] or self.train_index(), True),
                self.dataset(cfg, o["val_index"] or self.val_index(), False))

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return count_tokens(batch, self.patch_size)
