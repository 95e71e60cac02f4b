"""Image-text retrieval (COCO, Flickr30k): task ``retrieval``.

Training: the symmetric contrastive loss of the release over the whole global batch, with image
and text features gathered from every process and gradients through the local slice only
(:func:`distributed_contrastive_loss`); after DDP averages the parameter gradients, a run over W
processes takes the same step as one process with the whole batch
(``tests/tasks/test_distributed.py`` checks it with 2 gloo processes).

Evaluation: embeddings of the whole split are gathered from all processes before R@K is computed
(the release computes it on each process's shard, which is only right on one GPU). Images are
deduplicated by ``image_id``; texts are ordered by their row in the index, so the result does not
depend on the number of processes.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from beit3.data import ImageTextDataset
from beit3.models import Beit3ForImageTextRetrieval
from beit3.tasks.common import VisionLanguageTask, model_inputs
from beit3.tasks.metrics import retrieval_recall
from beit3.training.config import RunConfig
from beit3.training.distributed import all_gather_objects
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {"dataset": "coco", "max_text_len": 64, "randaug": False}
INDEX_PREFIX = {"coco": "coco_retrieval", "flickr30k": "flickr30k"}


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All processes' features in rank order; only this process's slice carries a gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.detach().contiguous())
    parts[dist.get_rank()] = features
    return torch.cat(parts, dim=0)


def distributed_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                                 scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the pairs of every process, with gradients through the local slice.

    image_embeds, text_embeds: (B, D) local, L2-normalised, row i of each a pair; every process
    has the same B. scale: exp(logit_scale). Each process computes the loss of the whole global
    batch (the value one process would compute) from gathered features, but only its own rows
    carry a gradient, so no collective runs in backward (a collective in backward races with
    DDP's gradient all-reduce on gloo). Two rescalings make the averaged update exact: the loss's
    gradient is multiplied by W, so the W local parts average to the full gradient, and the
    scale's by 1/W, because every process already sees the whole of its gradient.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    all_images = gather_features(image_embeds.float())  # (W*B, D)
    all_texts = gather_features(text_embeds.float())  # (W*B, D)
    scale = scale.float()
    if world > 1:
        scale = scale / world + scale.detach() * (1 - 1 / world)  # value unchanged, gradient / W
    logits = scale * all_images @ all_texts.t()  # (W*B, W*B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    if world > 1:
        loss = world * loss - (world - 1) * loss.detach()  # value unchanged, gradient x W
    return loss


def scale_from_logits(logits: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) read back from the model output, with a gradient to ``logit_scale`` only.

    The model returns ``logits = S * C`` with ``C`` the cosines of its embeddings; the task needs
    ``S`` without reaching into a (possibly DDP-wrapped or sharded) model for the parameter.
    ``logits - S.detach() * C`` is zero in value, and its gradient reaches ``S`` but cancels on the
    embeddings; projecting it on ``C`` and adding the detached least-squares ratio gives ``S`` with
    exactly the parameter's gradient (the embeddings get theirs through the loss only).
    """
    cosines = image_embeds.float() @ text_embeds.float().t()  # (B, B), with gradient
    fixed = cosines.detach()
    denom = (fixed * fixed).sum()
    scale = (logits.detach().float() * fixed).sum() / denom
    return scale + ((logits.float() - scale * cosines) * fixed).sum() / denom


class RetrievalTask(VisionLanguageTask):
    name = "retrieval"
    defaults = DEFAULTS
    model_class = Beit3ForImageTextRetrieval
    raw_dataset = ImageTextDataset
    metric_name = "average_score"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if self.options["dataset"] not in INDEX_PREFIX:
            raise ValueError(f"task.options.dataset must be one of {sorted(INDEX_PREFIX)}, got {self.options['dataset']!r}")

    def train_index(self) -> str:
        return f"{INDEX_PREFIX[self.options['dataset']]}.train.jsonl"

    def val_index(self) -> str:
        return f"{INDEX_PREFIX[self.options['dataset']]}.val.jsonl"

    default_split = "val"

    def split_index(self, split: str) -> str:
        """``val`` or ``test`` (Karpathy splits)."""
        return f"{INDEX_PREFIX[self.options['dataset']]}.{split}.jsonl"

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**model_inputs(batch), return_loss=False)
        scale = scale_from_logits(out.logits_per_image, out.image_embeds, out.text_embeds)
        loss = distributed_contrastive_loss(out.image_embeds, out.text_embeds, scale)
        return loss, {"logit_scale": float(scale.detach())}

    def embed_split(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Embeddings of the whole split from all processes: images with ids, texts in index order."""
        parts: dict[str, list[torch.Tensor]] = {"image_embeds": [], "text_embeds": [], "image_id": [], "index": []}
        for batch in batches:
            keep = ~batch["is_padding"]
            out = model(**model_inputs(batch), return_loss=False)
            parts["image_embeds"].append(out.image_embeds[keep].float().cpu())
            parts["text_embeds"].append(out.text_embeds[keep].float().cpu())
            parts["image_id"].append(batch["image_id"][keep].cpu())
            parts["index"].append(batch["index"][keep].cpu())
        local = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
        gathered = all_gather_objects(local)
        merged = {k: torch.cat([g[k] for g in gathered if g[k].numel()]) for k in local}
        order = torch.argsort(merged["index"])
        return {k: v[order] for k, v in merged.items()}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        split = self.embed_split(model, batches)
        out = retrieval_recall(split["image_embeds"], split["image_id"], split["text_embeds"], split["image_id"])
        out["texts"] = float(len(split["index"]))
        return out


register_task("retrieval", "finetune", RetrievalTask, "image-text retrieval (COCO, Flickr30k): contrastive, R@1/5/10")
