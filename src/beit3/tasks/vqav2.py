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

from collections import Counter, defaultdict
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beit3.catalogue import TaskSpec, register_task
from beit3.data import VQADataset, read_jsonl
from beit3.data.builders import read_answer2label
from beit3.models import Beit3ForVisualQuestionAnswering
from beit3.tasks.common import VisionLanguageTask, index_files, index_rows, kept, model_inputs
from beit3.tasks.metrics import vqa_accuracy, write_vqa_submission
from beit3.training.config import RunConfig
from beit3.training.logging import logger

DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "randaug": True,
    "max_text_len": 64,
    "answer2label": "answer2label.txt",
}
ANSWER_TYPES = {"yes/no": "yes_no", "number": "number", "other": "other"}
"""The official evaluation's answer types and the suffix of their metric key."""


def question_only_prior(spec: TaskSpec, index_root: Path) -> dict[str, Any]:
    """The "question-only prior" of the VQA literature, as a baseline: each eval question gets the
    training answer with the highest summed soft score among questions of the same first three
    words (from the task's own training and validation splits)."""
    def question_type(text: str) -> str:
        return " ".join(text.lower().split()[:3])

    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in (r for name in spec.train_index() for r in index_rows(index_root, name)):
        for label, score in zip(r["labels"], r["scores"]):
            by_type[question_type(r["text"])][label] += score
    val = index_rows(index_root, spec.index_file(spec.eval_split))
    score = 0.0
    for r in val:
        counts = by_type.get(question_type(r["text"]))
        guess = counts.most_common(1)[0][0] if counts else None
        score += dict(zip(r["labels"], r["scores"])).get(guess, 0.0)
    return {"name": "question-only prior", "value": 100 * score / len(val)}


def write_submission(task: "VQATask", stats: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """``beit3 evaluate`` on a split without answers (test-dev, test): the EvalAI file."""
    if context["has_labels"]:
        return {}
    target = Path(context["output"] or Path(context["checkpoint"]) / f"submit_vqav2_{context['split']}.json")
    if context["is_main"]:
        write_vqa_submission(target, [(qid, task.answers[label]) for qid, label in stats["predictions"]])
    return {"submission": str(target)}


@register_task
class VQATask(VisionLanguageTask):
    spec = TaskSpec(
        name="vqav2", kind="finetune", aliases=("vqa",),
        hub_pipeline_tag="visual-question-answering",
        description="VQAv2 answer classification: soft-score BCE, vqa_score",
        model_class=Beit3ForVisualQuestionAnswering, head_keys=("pooler.dense.weight", "head.0.weight"),
        image_mode="vl", randaug=True, index="vqa.{split}.jsonl", train_splits=("train", "trainable_val"),
        eval_split="rest_val", splits=("rest_val", "val", "test-dev", "test"), metric="vqa_score",
        statistics={"soft_score": "sum", "questions": "sum", "predictions": "gather"},
        baseline=question_only_prior, probe_features=("pair", "text"), evaluate_hook=write_submission, pipeline="beit3.pipelines:VQAPipeline", verb="vqa",
        predict="beit3.tasks.predict:add_vqa",
    )
    defaults = DEFAULTS
    raw_dataset = VQADataset

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

    def processor_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes}

    def dataset_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_classes}

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**model_inputs(batch), labels=batch["labels"]).loss, {}

    @cached_property
    def annotations(self) -> dict[int, tuple[list[str], str | None]] | None:
        """Raw annotator answers and answer type by question id, from the validation index.

        None when a row has no ``raw_answers`` (an index built before they were kept): then the
        official accuracy is not reported and one warning says how to rebuild the index.
        """
        paths = index_files(self.cfg.data.root, self.val_index())
        rows = [row for path in paths for row in read_jsonl(path, ("qid",))]
        if all("raw_answers" in row for row in rows):
            return {int(row["qid"]): (row["raw_answers"], row.get("answer_type")) for row in rows}
        logger.warning("vqa_accuracy not reported: %s has no raw_answers (built by an older version); "
                       "rebuild it with `beit3 data build vqav2 --root <coco> --out <index>`", ", ".join(map(str, paths)))
        return None

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Soft score of the argmax answer and the question count (when the split has answers),
        and (question id, answer label) of every counted question."""
        keep = kept(batch)
        logits = model(**model_inputs(batch)).logits
        best = logits.argmax(-1)
        out: dict[str, Any] = {"questions": keep.sum()}
        if "labels" in batch:
            out["soft_score"] = (batch["labels"].float().gather(1, best[:, None])[:, 0] * keep).sum()
        out["predictions"] = [(qid, label) for qid, label, k in
                              zip(batch["qid"].tolist(), best.tolist(), keep.tolist()) if k]
        return out

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        questions = float(stats["questions"])
        if "soft_score" not in stats:  # a split without answers: predictions only (see write_submission)
            return {"questions": len({qid for qid, _ in stats["predictions"]})}
        metrics = {"vqa_score": 100 * float(stats["soft_score"]) / max(questions, 1.0)}
        annotations = self.annotations
        if annotations is not None:
            totals = {t: [0.0, 0] for t in ANSWER_TYPES}
            overall = 0.0
            for qid, label in stats["predictions"]:
                raw_answers, answer_type = annotations[qid]
                accuracy = vqa_accuracy(self.answers[label], raw_answers)
                overall += accuracy
                if answer_type in totals:
                    totals[answer_type][0] += accuracy
                    totals[answer_type][1] += 1
            metrics["vqa_accuracy"] = 100 * overall / max(questions, 1.0)
            for answer_type, (total, count) in totals.items():
                if count:
                    metrics[f"vqa_accuracy_{ANSWER_TYPES[answer_type]}"] = 100 * total / count
        metrics["questions"] = int(questions)
        return metrics
