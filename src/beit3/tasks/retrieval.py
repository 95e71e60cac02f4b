"""Image-text retrieval (COCO, Flickr30k): task ``retrieval``.

Training: the symmetric contrastive loss of the release, with image and text features gathered
from every process. Each process scores its own rows against all gathered features (labels offset
by rank x local batch); ``torch.distributed.nn.functional.all_gather`` sends each process the
gradient with respect to its own slice, summed over the processes that used it, so after DDP
averages the parameter gradients a run over W processes takes the same step as one process with
the whole batch (``tests/tasks/test_distributed.py``).

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
from torch.utils.data import Dataset

from beit3.data import ImageTextDataset
from beit3.models import Beit3ForImageTextRetrieval
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
from beit3.tasks.metrics import retrieval_recall
from beit3.training.config import RunConfig
from beit3.training.distributed import all_gather_objects
from beit3.training.task import register_task

DEFAULTS: dict[str, Any] = {"dataset": "coco", "max_text_len": 64, "randaug": False}
INDEX_PREFIX = {"coco": "coco_retrieval", "flickr30k": "flickr30k"}


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' features, concatenated in rank order, and where this process's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(features.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * features.shape[0]


def distributed_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                                 logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of the local rows against the features of every process.

    image_embeds, text_embeds: (B, D) local, L2-normalised; row i of each is a pair. Every process
    must use the same local batch size.
    """
    all_images, offset = gather_with_grad(image_embeds.float())
    all_texts, _ = gather_with_grad(text_embeds.float())
    scale = logit_scale.float()
    logits_i2t = scale * image_embeds.float() @ all_texts.t()  # (B, W*B)
    logits_t2i = scale * text_embeds.float() @ all_images.t()  # (B, W*B)
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    return (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2


def scale_from_logits(logits: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) read back from the model output, keeping its gradient.

    The model returns ``logits = scale * cosines``; the least-squares ratio recovers the scale
    exactly and its gradient flows to ``logit_scale`` through ``logits``, so the task never has to
    reach into a (possibly DDP-wrapped or sharded) model for the parameter.
    """
    cosines = (image_embeds @ text_embeds.t()).detach().float()
    return (logits.float() * cosines).sum() / (cosines * cosines).sum()


class RetrievalTask:
    metric_name = "average_score"
    higher_is_better = True

    def __init__(self, cfg: RunConfig) -> None:
        self.options = parse_options("retrieval", cfg.task.options, DEFAULTS)
        if self.options["dataset"] not in INDEX_PREFIX:
            raise ValueError(f"task.options.dataset must be one of {sorted(INDEX_PREFIX)}, got {self.options['dataset']!r}")
        self.patch_size = 16

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = build_task_model(Beit3ForImageTextRetrieval, cfg, None)
        self.patch_size = model.config.patch_size
        return model

    def dataset(self, cfg: RunConfig, names, train: bool) -> Dataset:
        tokenizer = load_tokenizer(self.options, cfg)
        images = image_processor("retrieval", cfg, train, randaug=bool(self.options["randaug"]))
        collate = make_collator(tokenizer, images, int(self.options["max_text_len"]), task="retrieval")
        return ProcessedDataset(ImageTextDataset(index_files(cfg.data.root, names)), collate)

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        o, prefix = self.options, INDEX_PREFIX[self.options["dataset"]]
        return (self.dataset(cfg, o["train_index"] or f"{prefix}.train.jsonl", True),
                self.dataset(cfg, o["val_index"] or f"{prefix}.val.jsonl", False))

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], return_loss=False)
        scale = scale_from_logits(out.logits_per_image, out.image_embeds, out.text_embeds)
        loss = distributed_contrastive_loss(out.image_embeds, out.text_embeds, scale)
        return loss, {"logit_scale": float(scale.detach())}

    def embed_split(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Embeddings of the whole split from all processes: images with ids, texts in index order."""
        parts: dict[str, list[torch.Tensor]] = {"image_embeds": [], "text_embeds": [], "image_id": [], "index": []}
        for batch in batches:
            keep = ~batch["is_padding"]
            out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"], return_loss=False)
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

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return count_tokens(batch, self.patch_size)


register_task("retrieval", "finetune", RetrievalTask, "image-text retrieval (COCO, Flickr30k): contrastive, R@1/5/10")
