"""VQAv2 as answer classification over the answer vocabulary: task ``vqav2``.

Training targets are the soft scores of ``answer2label.txt`` (0.3 per annotator, capped at 1);
the loss is the release's binary cross-entropy summed over answers, averaged over the batch.

Validation reports two numbers, in %:

* ``vqa_score``: the local soft score the official fine-tuning prints (the target score of the
  argmax answer); it selects the best checkpoint, as in the release;
* ``vqa_accuracy``: the official VQA accuracy (:func:`beit3.tasks.metrics.vqa_accuracy` of the
  predicted answer string against the ten raw annotator answers), with ``vqa_accuracy_yes_no``,
  ``vqa_accuracy_number`` and ``vqa_accuracy_other`` per answer type as the official evaluation
  prints them. It needs the ``raw_answers`` (and ``answer_type``) of the index rows; an index
  built before they were kept gives ``vqa_score`` only, with a note to rebuild it.

On a default index the two are equal (0.3 per annotator capped at 1 is the official formula for
ten annotators); on a ``--legacy`` index the soft score misses other spellings of an answer and is
lower. Both are taken over the questions of the index, which leaves out, as the release does,
questions none of whose annotator answers is in the vocabulary. Test-dev predictions go to the EvalAI file
with :func:`beit3.tasks.metrics.write_vqa_submission` (``beit3 evaluate --task vqav2 --split test-dev``).
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from beit3.data import VQADataset, read_jsonl
from beit3.data.builders import read_answer2label
from beit3.models import Beit3ForVisualQuestionAnswering
from beit3.tasks.common import VisionLanguageTask, index_files, model_inputs
from beit3.tasks.metrics import vqa_accuracy, vqa_soft_score
from beit3.training.config import RunConfig
from beit3.training.distributed import all_gather_objects, all_reduce_sum
from beit3.training.logging import logger
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "randaug": True,
    "max_text_len": 64,
    "answer2label": "answer2label.txt",
}
TRAIN_INDEX = ["vqa.train.jsonl", "vqa.trainable_val.jsonl"]
VAL_INDEX = "vqa.rest_val.jsonl"
ANSWER_TYPES = {"yes/no": "yes_no", "number": "number", "other": "other"}
"""The official evaluation's answer types and the suffix of their metric key."""


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

    @cached_property
    def annotations(self) -> dict[int, tuple[list[str], str | None]] | None:
        """Raw annotator answers and answer type by question id, from the validation index.

        None when a row has no ``raw_answers`` (an index built before they were kept): then the
        official accuracy is not reported and one warning says how to rebuild the index.
        """
        paths = index_files(self.cfg.data.root, self.options["val_index"] or self.val_index())
        rows = [row for path in paths for row in read_jsonl(path, ("qid",))]
        if all("raw_answers" in row for row in rows):
            return {int(row["qid"]): (row["raw_answers"], row.get("answer_type")) for row in rows}
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning("vqa_accuracy not reported: %s has no raw_answers (built by an older version); "
                           "rebuild it with `beit3 data build vqav2 --root <coco> --out <index>`",
                           ", ".join(map(str, paths)))
        return None

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        annotations = self.annotations
        types = list(ANSWER_TYPES)
        # Per-process sums, added over processes at the end (padding rows are never counted):
        # soft score, questions, official accuracy, then (accuracy, questions) per answer type.
        sums = torch.zeros(3 + 2 * len(types), dtype=torch.float64)
        for batch in batches:
            keep = ~batch["is_padding"]
            logits = model(**model_inputs(batch)).logits[keep]
            sums[0] += vqa_soft_score(logits, batch["labels"][keep])
            sums[1] += int(keep.sum())
            if annotations is None:
                continue
            for qid, label in zip(batch["qid"][keep].tolist(), logits.argmax(-1).tolist()):
                raw_answers, answer_type = annotations[qid]
                accuracy = vqa_accuracy(self.answers[label], raw_answers)
                sums[2] += accuracy
                if answer_type in ANSWER_TYPES:
                    slot = 3 + 2 * types.index(answer_type)
                    sums[slot] += accuracy
                    sums[slot + 1] += 1
        # NCCL reduces only GPU tensors: reduce on the model's device, as the training loop does.
        device = next(model.parameters()).device
        sums = all_reduce_sum(sums.to(device)).cpu()
        questions = max(sums[1].item(), 1.0)
        metrics = {"vqa_score": 100 * sums[0].item() / questions}
        if annotations is not None:
            metrics["vqa_accuracy"] = 100 * sums[2].item() / questions
            for n, answer_type in enumerate(types):
                total, count = sums[3 + 2 * n].item(), sums[4 + 2 * n].item()
                if count:
                    metrics[f"vqa_accuracy_{ANSWER_TYPES[answer_type]}"] = 100 * total / count
        metrics["questions"] = sums[1].item()
        return metrics

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
