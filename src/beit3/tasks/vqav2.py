"""VQAv2 as answer classification over the answer vocabulary: task ``vqav2``.

Training targets are the soft scores of ``answer2label.txt`` (0.3 per annotator, capped at 1);
the loss is the release's binary cross-entropy summed over answers, averaged over the batch.
Validation reports the local soft score (``vqa_score``, in %, the number the official fine-tuning
prints). The official VQA accuracy needs the ten raw annotator answers, which the index does not
keep: compute it with :func:`beit3.tasks.metrics.vqa_accuracy` on predictions from
:meth:`VQATask.predict`, and write the EvalAI file for test-dev with
:func:`beit3.tasks.metrics.write_vqa_submission` (``beit3 evaluate --task vqav2 --split test-dev``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from beit3.data import VQADataset
from beit3.data.builders import read_answer2label
from beit3.models import Beit3ForVisualQuestionAnswering
from beit3.tasks.common import VisionLanguageTask, index_files, model_inputs
from beit3.tasks.metrics import vqa_soft_score
from beit3.training.config import RunConfig
from beit3.training.distributed import all_gather_objects, all_reduce_sum
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "randaug": True,
    "max_text_len": 64,
    "answer2label": "answer2label.txt",
}
TRAIN_INDEX = ["vqa.train.jsonl", "vqa.trainable_val.jsonl"]
VAL_INDEX = "vqa.rest_val.jsonl"


class VQATask(VisionLanguageTask):
    name = "vqav2"
    defaults = DEFAULTS
    model_class = Beit3ForVisualQuestionAnswering
    raw_dataset = VQADataset
    metric_name = "vqa_score"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self._labels: list[str] | None = None

    @property
    def answers(self) -> list[str]:
        """Answer strings by label id, from ``answer2label.txt`` under ``data.root``."""
        if self._labels is None:
            (path,) = index_files(self.cfg.data.root, self.options["answer2label"])
            answer2label = read_answer2label(path)
            labels = [""] * len(answer2label)
            for answer, label in answer2label.items():
                labels[label] = answer
            self._labels = labels
        return self._labels

    @property
    def num_classes(self) -> int:
        given = self.options["num_classes"]
        if self.cfg.data.root is None and given is not None:
            return int(given)
        found = len(self.answers)
        if given is not None and int(given) != found:
            raise ValueError(f"task.options.num_classes={given} but {self.options['answer2label']} has {found} answers")
        return found

    def head_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes}

    def collate_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes}

    def train_index(self) -> list[str]:
        return TRAIN_INDEX

    def val_index(self) -> str:
        return VAL_INDEX

    default_split = "rest_val"

    def split_index(self, split: str) -> str:
        """``rest_val`` (local validation), ``val``, ``test-dev``, ``test``."""
        return f"vqa.{split}.jsonl"

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**model_inputs(batch), labels=batch["labels"]).loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        sums = torch.zeros(2, dtype=torch.float64)  # score, questions
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(**model_inputs(batch)).logits
            sums += torch.tensor([vqa_soft_score(logits[keep], batch["labels"][keep]), int(keep.sum())],
                                 dtype=torch.float64)
        all_reduce_sum(sums)
        return {"vqa_score": 100 * sums[0].item() / max(sums[1].item(), 1.0), "questions": sums[1].item()}

    def predict(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> list[tuple[int, str]]:
        """(question id, answer string) for every question of the split, gathered from all processes."""
        mine: list[tuple[int, str]] = []
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(**model_inputs(batch)).logits
            for qid, label in zip(batch["qid"][keep].tolist(), logits[keep].argmax(-1).tolist()):
                mine.append((qid, self.answers[label]))
        return [pair for part in all_gather_objects(mine) for pair in part]


register_task("vqav2", "finetune", VQATask, "VQAv2 answer classification: soft-score BCE, vqa_score")
