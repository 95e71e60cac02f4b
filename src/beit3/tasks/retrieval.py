"""Image-text retrieval (COCO, Flickr30k): task ``retrieval``.

Training: the symmetric contrastive loss of the release over the whole global batch, with image
and text features gathered from every process and gradients through the local slice only
(:func:`distributed_contrastive_loss`); after DDP averages the parameter gradients, a run over W
processes takes the same step as one process with the whole batch
(``tests/tasks/test_distributed.py`` checks it with 2 gloo processes); the loss is in
:mod:`beit3.training.contrastive`.

Evaluation: embeddings of the whole split are gathered from all processes before R@K is computed
(the release computes it on each process's shard, which is only right on one GPU). Images are
deduplicated by ``image_id``; texts are ordered by their row in the index, so the result does not
depend on the number of processes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beit3.catalogue import TaskSpec, register_task
from beit3.data import ImageTextDataset
from beit3.models import Beit3ForImageTextRetrieval
from beit3.tasks.common import VisionLanguageTask, index_rows, kept, model_inputs
from beit3.tasks.metrics import retrieval_recall
from beit3.training.contrastive import distributed_contrastive_loss

DEFAULTS: dict[str, Any] = {"dataset": "coco", "max_text_len": 64, "randaug": False}
EMBEDDINGS = ("image_embeds", "text_embeds", "image_id", "index")


def random_ranking(spec: TaskSpec, index_root: Path) -> dict[str, Any]:
    """Mean R@1/5/10 of a random ranking of the eval split's images. A text's one image is in the
    top k of N images with probability k/N; an image's five texts among 5N give about the same."""
    images = len({r["image_id"] for r in index_rows(index_root, spec.index_file(spec.eval_split))})
    return {"name": "random ranking", "value": 100 * sum(min(1.0, k / images) for k in (1, 5, 10)) / 3}


@register_task
class RetrievalTask(VisionLanguageTask):
    spec = TaskSpec(
        name="retrieval", kind="finetune", aliases=("image-text-retrieval",),
        hub_pipeline_tag="zero-shot-image-classification",
        description="image-text retrieval (COCO, Flickr30k): contrastive, R@1/5/10",
        model_class=Beit3ForImageTextRetrieval, head_keys=("vision_head.weight", "language_head.weight"),
        image_mode="vl", index="{prefix}.{split}.jsonl", datasets={"coco": "coco_retrieval", "flickr30k": "flickr30k"},
        eval_split="val", splits=("val", "test"), metric="average_score", baseline=random_ranking,
        statistics={key: "gather" for key in EMBEDDINGS}, pipeline="beit3.pipelines:ZeroShotPipeline",
        verb="zero-shot",
        predict="beit3.tasks.predict:add_zero_shot",
    )
    defaults = DEFAULTS
    raw_dataset = ImageTextDataset

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**model_inputs(batch), return_loss=False)
        scale = out.logit_scale  # exp(logit_scale), with its gradient
        loss = distributed_contrastive_loss(out.image_embeds, out.text_embeds, scale)
        return loss, {"logit_scale": scale.detach()}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """This batch's embeddings (on the CPU), with image ids and index rows, to be gathered."""
        keep = kept(batch)
        out = model(**model_inputs(batch), return_loss=False)
        rows = {"image_embeds": out.image_embeds.float(), "text_embeds": out.text_embeds.float(),
                "image_id": batch["image_id"], "index": batch["index"]}
        return {key: [value[keep].cpu()] for key, value in rows.items()}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        """R@K over the whole split: images deduplicated by id, texts in index order (so the result
        does not depend on the number of processes)."""
        split = {key: torch.cat(stats[key]) for key in EMBEDDINGS}
        order = torch.argsort(split["index"])
        split = {key: value[order] for key, value in split.items()}
        out = retrieval_recall(split["image_embeds"], split["image_id"], split["text_embeds"], split["image_id"])
        out["texts"] = len(split["index"])
        return out
