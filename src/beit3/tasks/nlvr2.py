"""NLVR2: is a statement true of a pair of images? Task ``nlvr2``.

Cross-entropy over {false, true} (label 1 = true), accuracy in % on the dev split during training
(test-P with ``beit3 evaluate --split test-P``), as the release.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from beit3.data import NLVR2Dataset
from beit3.models import Beit3ForVisualReasoning
from beit3.tasks.common import (
    ProcessedDataset,
    build_task_model,
    count_tokens,
    image_processor,
    index_files,
    load_tokenizer,
    make_collator,
    parse_options,
)
from beit3.tasks.metrics import pair_accuracy_correct
from beit3.training.config import RunConfig
from beit3.training.distributed import all_reduce_sum
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {"randaug": False, "max_text_len": 64}
TRAIN_INDEX = "nlvr2.train.index.jsonl"
VAL_INDEX = "nlvr2.dev.index.jsonl"


class NLVR2Task:
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options("nlvr2", cfg.task.options, DEFAULTS)
        self.patch_size = 16

    model_class = Beit3ForVisualReasoning

    def head_args(self) -> dict[str, Any]:
        return {}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = build_task_model(self.model_class, cfg, None)
        self.patch_size = model.config.patch_size
        return model

    default_split = "dev"

    def split_index(self, split: str) -> str:
        """``dev`` or ``test-P``."""
        return f"nlvr2.{split}.index.jsonl"

    def dataset(self, cfg: RunConfig, names, train: bool) -> Dataset:
        tokenizer = load_tokenizer(self.options, cfg)
        images = image_processor("nlvr2", cfg, train, randaug=bool(self.options["randaug"]))
        collate = make_collator(tokenizer, images, int(self.options["max_text_len"]), task="nlvr2")
        return ProcessedDataset(NLVR2Dataset(index_files(cfg.data.root, names)), collate)

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o = self.options
        return (self.dataset(cfg, o["train_index"] or TRAIN_INDEX, True),
                self.dataset(cfg, o["val_index"] or VAL_INDEX, False))

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        sums = torch.zeros(2, dtype=torch.float64)  # correct, pairs
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            sums += torch.tensor([pair_accuracy_correct(logits[keep], batch["labels"][keep]), int(keep.sum())],
                                 dtype=torch.float64)
        all_reduce_sum(sums)
        return {"accuracy": 100 * sums[0].item() / max(sums[1].item(), 1.0), "samples": sums[1].item()}

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return count_tokens(batch, self.patch_size)


register_task("nlvr2", "finetune", NLVR2Task, "NLVR2 statement about an image pair: cross-entropy, accuracy")
