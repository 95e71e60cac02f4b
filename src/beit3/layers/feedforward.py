"""The feed-forward expert with Magneto's sub-LayerNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """fc1 -> GELU (exact erf form) -> LayerNorm over the hidden width -> fc2.

    The LayerNorm inside the FFN is Magneto's sub-LN; together with the pre-LN before the block it
    keeps deep models stable without DeepNorm's residual scaling.
    """

    def __init__(self, dim: int, hidden_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))
