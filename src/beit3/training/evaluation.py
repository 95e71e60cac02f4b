"""Evaluation owned by the engine: tasks give per-batch statistics, the engine reduces them.

A task's ``eval_step`` returns, for each key its spec declares in ``statistics``, a tensor to sum
or max, or a list to gather. The engine accumulates them over batches on the device they were made
on (no host sync per batch), then combines them over processes. Every collective runs on the
process group's device (``DistInfo.device``: the GPU under NCCL, which rejects CPU tensors) and no
task imports ``torch.distributed``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from beit3.training import distributed as D


def accumulate(totals: dict[str, Any], part: Mapping[str, Any], statistics: Mapping[str, str]) -> dict[str, Any]:
    """Add one batch's statistics into ``totals`` (in place; returned)."""
    for key, value in part.items():
        how = statistics.get(key)
        if how is None:
            raise KeyError(f"eval_step returned statistic '{key}', which the task's spec does not declare "
                           f"(declared: {', '.join(sorted(statistics)) or 'none'})")
        if how == "gather":
            totals.setdefault(key, []).extend(value)
        elif key not in totals:  # sums and maxima are kept in 64 bits, whatever a batch gives
            value = torch.as_tensor(value).detach()
            totals[key] = value.double() if value.is_floating_point() else value.long()
        elif how == "sum":
            totals[key] += value
        else:
            totals[key] = torch.maximum(totals[key], torch.as_tensor(value))
    return totals


def reduce_statistics(totals: dict[str, Any], statistics: Mapping[str, str], device: torch.device) -> dict[str, Any]:
    """Combine this process's totals with every other's; tensors come back on the CPU.

    Every process must have the same keys (the tasks return every key for every batch, and
    :class:`~beit3.training.distributed.EvalSampler` gives each process as many batches).
    """
    out: dict[str, Any] = {}
    for key in sorted(totals):
        value = totals[key]
        how = statistics[key]
        if how == "gather":
            out[key] = [item for part in D.all_gather_objects(list(value)) for item in part]
            continue
        tensor = value.detach().to(device)
        tensor = D.all_reduce_sum(tensor) if how == "sum" else D.all_reduce_max(tensor)
        out[key] = tensor.cpu()
    return out


def evaluate_batches(task: Any, model: nn.Module, batches: Iterable[dict[str, Any]],
                     device: torch.device) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, reduced statistics) of ``task`` over ``batches`` (this process's shard)."""
    statistics = task.spec.statistics
    totals: dict[str, Any] = {}
    for batch in batches:
        accumulate(totals, task.eval_step(model, batch), statistics)
    stats = reduce_statistics(totals, statistics, device)
    return {k: float(v) for k, v in task.compute_metrics(stats).items()}, stats


def count_tokens(batch: Mapping[str, Any], patch_size: int) -> int:
    """Patches (+ CLS) of every image plus the real text tokens of a batch, for the tokens/s figure.

    Images are ``pixel_values`` (B, 3, H, W) or image pairs (B, 2, 3, H, W); each text row is
    counted once per image of its sample. Keys named ``*pixel_values`` / ``*attention_mask``
    (pretraining's ``image_`` / ``pair_`` streams) count too.
    """
    tokens = 0
    for key, value in batch.items():
        if key.endswith("pixel_values") and isinstance(value, torch.Tensor):
            images = value.shape[0] * (value.shape[1] if value.dim() == 5 else 1)
            tokens += images * ((value.shape[-2] // patch_size) * (value.shape[-1] // patch_size) + 1)
    for key, value in batch.items():
        if key.endswith("attention_mask") and isinstance(value, torch.Tensor):
            pixels = batch.get(key.replace("attention_mask", "pixel_values"))
            per_text = pixels.shape[1] if isinstance(pixels, torch.Tensor) and pixels.dim() == 5 else 1
            tokens += int(value.sum()) * per_text
    return tokens
