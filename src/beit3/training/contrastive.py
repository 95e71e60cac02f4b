"""Contrastive losses over the global batch of every process (retrieval fine-tuning, ITC tuning).

Training infrastructure, as OpenCLIP's loss module: the model returns per-process embeddings and
the engine's processes exchange them here, so no task talks to ``torch.distributed``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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
