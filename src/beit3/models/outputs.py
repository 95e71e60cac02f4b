"""Output dataclasses: one small, documented type per kind of result.

As Hugging Face's ``ModelOutput``, each is read by attribute (``out.logits``), by name
(``out["logits"]``) or by position (``out[0]``, ``loss, logits = out.to_tuple()`` ...); name and
position skip the fields that are ``None``, so ``out[0]`` is the loss only when one was computed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from beit3.layers import KVCache


class ModelOutput:
    """Mapping-and-tuple access for the output dataclasses (fields that are ``None`` are absent)."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no {key!r}; it has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclasses.dataclass
class Beit3ModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    """(B, T, D): image tokens first (CLS, patches), then text tokens."""
    vision_len: int
    """How many leading tokens are image tokens (0 for text-only input)."""
    hidden_states: list[torch.Tensor] | None = None
    """Embeddings and the output of every block (num_layers + 1 entries), when asked for."""
    past_key_values: KVCache | None = None
    """Per-layer keys and values, when ``use_cache=True``."""


@dataclasses.dataclass
class ClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)
    logits: torch.Tensor


@dataclasses.dataclass
class RetrievalOutput(ModelOutput):
    loss: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)
    image_embeds: torch.Tensor
    """(B, D), L2-normalised."""
    text_embeds: torch.Tensor
    """(B, D), L2-normalised."""
    logits_per_image: torch.Tensor
    """(B, B): scaled cosine similarities, image i against text j."""
    logits_per_text: torch.Tensor
    """(B, B): the transpose, text i against image j."""
    logit_scale: torch.Tensor
    """The learned temperature's ``exp()`` (a scalar with its gradient): the scale applied to the
    cosine similarities, for a loss computed elsewhere (e.g. over several processes)."""


@dataclasses.dataclass
class CaptioningOutput(ModelOutput):
    loss: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)
    logits: torch.Tensor
    """(B, T, vocab): next-word scores at every text position under the captioning mask."""
