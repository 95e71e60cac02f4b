"""Image captioning (COCO Karpathy split, NoCaps): task ``captioning``.

Training is the release's masked fine-tuning: a share ``mask_prob`` of each caption's tokens is
corrupted (``beit3.processing``), every text token sees the image and the tokens to its left, and
the masked slots are scored by KL divergence to a label-smoothed one-hot; from optimiser step
``drop_worst_after`` on, the worst ``drop_worst_ratio`` of the masked tokens of each micro-batch
are left out. Validation decodes with beam search and reports CIDEr-D (:func:`cider_d`, a
fraction as in the release: 1.434 is the "143.4" of the tables) on lower-cased, punctuation-free
words; ``beit3 evaluate`` adds BLEU, METEOR and ROUGE-L with the COCO toolkit when installed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from beit3.data import ImageTextDataset, read_jsonl
from beit3.models import Beit3ForCaptioning
from beit3.processing import Beit3Tokenizer
from beit3.tasks.common import (
    ProcessedDataset,
    build_task_model,
    count_tokens,
    image_processor,
    index_files,
    load_tokenizer,
    make_collator,
    parse_options,
    unwrap,
)
from beit3.tasks.metrics import cider_d
from beit3.training.config import RunConfig
from beit3.training.distributed import all_gather_objects
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {
    "dataset": "coco",
    "randaug": True,
    "max_text_len": 32,
    "mask_prob": 0.6,
    "drop_worst_after": 12000,
    "drop_worst_ratio": 0.2,
    "label_smoothing": 0.1,
    "num_beams": 3,
    "length_penalty": 0.6,
    "max_decode_len": None,
}
VAL_INDEX = {"coco": "coco_captioning.val.jsonl", "nocaps": "nocaps.val.jsonl"}

_PUNCTUATION = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lower-case words without punctuation: close to the PTB tokenisation COCO evaluation uses,
    without Java."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class CaptioningTask:
    metric_name = "cider"
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = parse_options("captioning", cfg.task.options, DEFAULTS)
        if self.options["dataset"] not in VAL_INDEX:
            raise ValueError(f"task.options.dataset must be one of {sorted(VAL_INDEX)}, got {self.options['dataset']!r}")
        self.patch_size = 16
        self._tokenizer: Beit3Tokenizer | None = None
        self._references: dict[int, list[str]] | None = None

    @property
    def tokenizer(self) -> Beit3Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.options, self.cfg)
        return self._tokenizer

    model_class = Beit3ForCaptioning

    def head_args(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                "mask_token_id": tok.mask_token_id, "label_smoothing": float(self.options["label_smoothing"])}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = build_task_model(self.model_class, cfg, self.tokenizer, **self.head_args())
        self.patch_size = model.config.patch_size
        return model

    default_split = "val"

    def split_index(self, split: str) -> str:
        """``val`` or ``test``: the Karpathy split for COCO, ``nocaps.<split>.jsonl`` for NoCaps."""
        prefix = "coco_captioning" if self.options["dataset"] == "coco" else "nocaps"
        return f"{prefix}.{split}.jsonl"

    def val_index(self) -> list:
        return index_files(self.cfg.data.root, self.options["val_index"] or VAL_INDEX[self.options["dataset"]])

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o = self.options
        max_len = int(o["max_text_len"])
        train_images = image_processor("captioning", cfg, True, o, randaug=bool(o["randaug"]))
        train_collate = make_collator(self.tokenizer, train_images, max_len, task="captioning", train=True,
                                      captioning_mask_prob=float(o["mask_prob"]))
        train = ProcessedDataset(
            ImageTextDataset(index_files(cfg.data.root, o["train_index"] or "coco_captioning.train.jsonl")), train_collate)
        val_collate = make_collator(self.tokenizer, image_processor("captioning", cfg, False, o), max_len, task="captioning")
        val = ProcessedDataset(ImageTextDataset(self.val_index()), val_collate)
        return train, val

    @property
    def references(self) -> dict[int, list[str]]:
        """Ground-truth captions of the validation split, by image id (read from its index)."""
        if self._references is None:
            refs: dict[int, list[str]] = {}
            for path in self.val_index():
                for row in read_jsonl(path, ("image_id", "references")):
                    refs[int(row["image_id"])] = list(row["references"])
            self._references = refs
        return self._references

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        drop = float(self.options["drop_worst_ratio"]) if step >= int(self.options["drop_worst_after"]) else 0.0
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                    masked_positions=batch["masked_positions"], drop_worst_ratio=drop)
        return out.loss, {"masked_tokens": float(batch["masked_positions"].sum())}

    def predict(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[int, str]:
        """Beam-search captions of every image of the split, from all processes, by image id."""
        o = self.options
        inner = unwrap(model)
        sharded = hasattr(inner, "unshard")  # FSDP2: generate() bypasses the root's forward hooks
        if sharded:
            inner.unshard()
        mine: dict[int, str] = {}
        try:
            for batch in batches:
                keep = ~batch["is_padding"]
                ids = inner.generate(batch["pixel_values"][keep], num_beams=int(o["num_beams"]),
                                     max_length=int(o["max_decode_len"] or o["max_text_len"]),
                                     length_penalty=float(o["length_penalty"]))
                for image_id, row in zip(batch["image_id"][keep].tolist(), ids.tolist()):
                    mine[image_id] = self.tokenizer.decode(row)
        finally:
            if sharded:
                inner.reshard()
        merged: dict[int, str] = {}
        for part in all_gather_objects(mine):
            merged.update(part)
        return merged

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        predictions = self.predict(model, batches)
        refs = {k: [simple_tokenize(r) for r in self.references[k]] for k in predictions}
        score, _ = cider_d({k: simple_tokenize(v) for k, v in predictions.items()}, refs)
        return {"cider": score, "images": float(len(predictions))}

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return count_tokens(batch, self.patch_size)


register_task("captioning", "finetune", CaptioningTask, "captioning (COCO, NoCaps): masked fine-tuning, CIDEr")
