"""``BatchEncoding``: what the tokenizer and the processors return, as in Hugging Face.

A ``dict`` (so ``model(**batch)`` works), whose keys can also be read as attributes
(``batch.input_ids``), with ``.to(device)`` / ``.to(dtype)`` for its tensors.
"""
from __future__ import annotations

from typing import Any

import torch


class BatchEncoding(dict):
    """Model inputs by name: ``pixel_values``, ``input_ids``, ``attention_mask`` ..."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r}; it has {sorted(self)}") from None

    def to(self, device: str | torch.device | torch.dtype | None = None, *,
           dtype: torch.dtype | None = None, non_blocking: bool = False) -> "BatchEncoding":
        """Move every tensor to ``device``; a floating dtype (``.to(torch.bfloat16)``) casts only the
        floating tensors (pixels), never the integer ids and masks. Returns a new batch."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"BatchEncoding.to casts floating tensors only; got dtype {dtype}")
        moved = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast, non_blocking=non_blocking)
            moved[key] = value
        return type(self)(moved)

    def __repr__(self) -> str:
        def describe(value: Any) -> str:
            if isinstance(value, torch.Tensor):
                return f"Tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            return repr(value)

        return f"{type(self).__name__}({{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in self.items()) + "})"
