"""Stochastic depth (drop path) as a mask, so that one draw covers every stream of a sample."""
from __future__ import annotations

import torch


def drop_path_mask(batch_size: int, rate: float | torch.Tensor, training: bool,
                   like: torch.Tensor) -> torch.Tensor | None:
    """Per-sample keep mask of shape (B, 1, 1), already divided by the keep probability.

    The vision and text streams of one sample are one residual branch in the official joint
    sequence, so both are dropped together: draw once, multiply every stream by the same mask.
    Returns None when nothing is dropped (evaluation or rate 0), so callers skip the multiply.
    ``rate`` may be a 0-d tensor (a graph input under ``torch.compile``, not a constant); it is
    then taken as non-zero.
    """
    if not training or (not isinstance(rate, torch.Tensor) and rate == 0.0):
        return None
    if isinstance(rate, torch.Tensor):
        keep = (1.0 - rate).to(like.dtype)
        return (torch.rand(batch_size, 1, 1, dtype=like.dtype, device=like.device) < keep).to(like.dtype) / keep
    keep = 1.0 - rate
    mask = torch.empty(batch_size, 1, 1, dtype=like.dtype, device=like.device).bernoulli_(keep)
    return mask.div_(keep)
