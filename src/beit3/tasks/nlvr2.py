"""NLVR2: is a statement true of a pair of images? Task ``nlvr2``.

Cross-entropy over {false, true} (label 1 = true), accuracy in % on the dev split during training
(test-P with ``beit3 evaluate --split test-P``), as the release.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from beit3.data import NLVR2Dataset
from beit3.models import Beit3ForVisualReasoning
from beit3.tasks.common import VisionLanguageTask, model_inputs
from beit3.tasks.metrics import pair_accuracy_correct
from beit3.training.distributed import all_reduce_sum
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {"randaug": False, "max_text_len": 64, "head_init_scale": 0.001}
TRAIN_INDEX = "nlvr2.train.index.jsonl"
VAL_INDEX = "nlvr2.dev.index.jsonl"


class NLVR2Task(VisionLanguageTask):
    name = "nlvr2"
    defaults = DEFAULTS
    model_class = Beit3ForVisualReasoning
    raw_dataset = NLVR2Dataset
    metric_name = "accuracy"

    def head_args(self) -> dict[str, Any]:
        return {"head_init_scale": float(self.options["head_init_scale"])}

    def train_index(self) -> str:
        return TRAIN_INDEX

    def val_index(self) -> str:
        return VAL_INDEX

    default_split = "dev"

    def split_index(self, split: str) -> str:
        """``dev`` or ``test-P``."""
        return f"nlvr2.{split}.index.jsonl"

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**model_inputs(batch), labels=batch["labels"]).loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        sums = torch.zeros(2, dtype=torch.float64)  # correct, pairs
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(**model_inputs(batch)).logits
            sums += torch.tensor([pair_accuracy_correct(logits[keep], batch["labels"][keep]), int(keep.sum())],
                                 dtype=torch.float64)
        all_reduce_sum(sums)
        return {"accuracy": 100 * sums[0].item() / max(sums[1].item(), 1.0), "samples": sums[1].item()}


register_task("nlvr2", "finetune", NLVR2Task, "NLVR2 statement about an image pair: cross-entropy, accuracy")
