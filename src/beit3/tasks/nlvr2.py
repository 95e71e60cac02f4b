"""NLVR2: is a statement true of a pair of images? Task ``nlvr2``.

Cross-entropy over {false, true} (label 1 = true), accuracy in % on the dev split during training
(test-P with ``beit3 evaluate --split test-P``), as the release.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from beit3.catalogue import TaskSpec, register_task
from beit3.data import NLVR2Dataset
from beit3.models import Beit3ForVisualReasoning
from beit3.tasks.common import VisionLanguageTask, kept, majority_baseline, model_inputs

DEFAULTS: dict[str, Any] = {"randaug": False, "max_text_len": 64, "head_init_scale": 0.001}


@register_task
class NLVR2Task(VisionLanguageTask):
    spec = TaskSpec(
        name="nlvr2", kind="finetune", aliases=("visual-reasoning",),
        hub_pipeline_tag="image-text-to-text",
        description="NLVR2 statement about an image pair: cross-entropy, accuracy",
        model_class=Beit3ForVisualReasoning, head_keys=("head.dense1.weight",), image_mode="vl",
        index="nlvr2.{split}.index.jsonl", eval_split="dev", splits=("dev", "test-P"), metric="accuracy",
        baseline=majority_baseline,
        statistics={"correct": "sum", "samples": "sum"}, pipeline="beit3.pipelines:VisualReasoningPipeline",
        verb="nlvr2",
        predict="beit3.tasks.predict:add_nlvr2",
    )
    defaults = DEFAULTS
    raw_dataset = NLVR2Dataset

    def head_args(self) -> dict[str, Any]:
        return {"head_init_scale": float(self.options["head_init_scale"])}

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**model_inputs(batch), labels=batch["labels"]).loss, {}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keep = kept(batch)
        logits = model(**model_inputs(batch)).logits
        return {"correct": (logits.argmax(-1).eq(batch["labels"]) & keep).sum(), "samples": keep.sum()}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        samples = float(stats["samples"])
        return {"accuracy": 100 * float(stats["correct"]) / max(samples, 1.0), "samples": int(samples)}
