"""Output dataclasses: one small, documented type per kind of result."""
from __future__ import annotations

import dataclasses

import torch

from beit3.layers import KVCache


@dataclasses.dataclass
class Beit3ModelOutput:
    last_hidden_state: torch.Tensor
    """(B, T, D): image tokens first (CLS, patches), then text tokens."""
    vision_len: int
    """How many leading tokens are image tokens (0 for text-only input)."""
    hidden_states: list[torch.Tensor] | None = None
    """Embeddings and the output of every block (num_layers + 1 entries), when asked for."""
    past_key_values: KVCache | None = None
    """Per-layer keys and values, when ``use_cache=True``."""


@dataclasses.dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclasses.dataclass
class RetrievalOutput:
    image_embeds: torch.Tensor
    """(B, D), L2-normalised."""
    text_embeds: torch.Tensor
    """(B, D), L2-normalised."""
    logits_per_image: torch.Tensor
    """(B, B): scaled cosine similarities, image i against text j."""
    loss: torch.Tensor | None = None


@dataclasses.dataclass
class CaptioningOutput:
    logits: torch.Tensor
    """(B, T, vocab): next-word scores at every text position under the captioning mask."""
    loss: torch.Tensor | None = None
