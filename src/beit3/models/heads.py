"""Small head modules shared by the task models (names match the release's keys)."""
from __future__ import annotations

import torch
from torch import nn

from beit3.models.base import init_module


class Pooler(nn.Module):
    """LayerNorm -> Linear -> tanh on one token (VQA pools the image CLS, token 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(token)))


class TwoLayerMLP(nn.Module):
    """norm1 -> dense1 -> norm2 -> GELU -> dense2 (the NLVR2 head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=eps)
        self.dense1 = nn.Linear(in_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=eps)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


def init_head(*modules: nn.Module, std: float, scale: float = 1.0) -> None:
    """Initialise head modules; ``scale`` shrinks their linear layers (the release uses 0.001
    for the classification and NLVR2 heads so that fine-tuning starts near uniform logits)."""
    for module in modules:
        module.apply(lambda sub: init_module(sub, std))
        if scale != 1.0:
            with torch.no_grad():
                for sub in module.modules():
                    if isinstance(sub, nn.Linear):
                        sub.weight.mul_(scale)
                        if sub.bias is not None:
                            sub.bias.mul_(scale)
