"""Multi-head self-attention over the joint image-text sequence, with per-modality projections."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from beit3.layers.multiway import Experts, expert


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for the tokens processed so far (incremental decoding).

    ``joint`` records whether the cached prefix holds an image, so that later text-only steps
    still use the vision-language experts of the top layers where the model has them.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v of shape (B, H, T, Dh)
    joint: bool

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def select(self, index: torch.Tensor) -> "KVCache":
        """Reorder / repeat the batch dimension (beam search)."""
        return KVCache([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers], self.joint)

    def truncate(self, length: int) -> "KVCache":
        """Keep the first ``length`` positions."""
        return KVCache([(k[:, :, :length], v[:, :, :length]) for k, v in self.layers], self.joint)


CPU_BF16_KERNELS = ("matmul", "sdpa")


def choose_cpu_bf16_attention(setting: str | None = None) -> str:
    """The kernel of bf16 attention on CPU: ``"matmul"`` (two bf16 matmuls around a float32 softmax)
    or ``"sdpa"`` (PyTorch's flash-attention kernel).

    ``BEIT3_CPU_BF16_ATTENTION=matmul|sdpa`` (or ``setting``) decides. Otherwise the CPU does: on
    one without AMX, ``matmul`` was faster than SDPA's kernel, forward + backward, on both CPUs it
    was measured on (x2.05 on an Intel AVX-512 BF16 machine, x1.14 on an AMD EPYC one;
    benchmarks/README.md); on one with AMX tiles, whose
    bf16 matrix units SDPA's kernel uses through oneDNN's brgemm, ``sdpa``. That last choice has not
    been measured here: no AMX machine was at hand. ``benchmarks/attention_kernels.py`` times both
    on the machine it runs on and says which to set. Read once, when this module is imported, so a
    run (and a compiled graph) keeps one kernel.
    """
    setting = os.environ.get("BEIT3_CPU_BF16_ATTENTION", "") if setting is None else setting
    setting = setting.strip().lower()
    if setting in CPU_BF16_KERNELS:
        return setting
    if setting not in ("", "auto"):
        raise ValueError(f"BEIT3_CPU_BF16_ATTENTION must be one of auto, {', '.join(CPU_BF16_KERNELS)}; "
                         f"got {setting!r}")
    has_amx = getattr(torch._C._cpu, "_init_amx", lambda: False)()
    return "sdpa" if has_amx else "matmul"


CPU_BF16_ATTENTION = choose_cpu_bf16_attention()
"""This process's choice (:func:`choose_cpu_bf16_attention`)."""


def _bf16_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as two bf16 matmuls around a float32 softmax: on CPU, PyTorch's bf16 kernel behind
    ``scaled_dot_product_attention`` takes twice as long for the same result (benchmarks/README.md)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).float()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class Attention(nn.Module):
    """Self-attention whose q/k/v/out projections and sub-LayerNorm may be per-modality.

    Each stream (vision tokens, text tokens) is projected by its own expert, the streams are
    joined for one ``scaled_dot_product_attention`` over all tokens, and split again for the
    sub-LN + output projection. q, k and v are fused into one projection per expert: one matmul
    instead of three; the official q/k/v weights are concatenated on load.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, decoupled: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

        def per_modality(make):
            return Experts(make) if decoupled else make()

        self.qkv = per_modality(lambda: nn.Linear(dim, 3 * dim))
        # Magneto's sub-LN: normalise the attention output before the output projection.
        self.inner_norm = per_modality(lambda: nn.LayerNorm(dim, eps=eps))
        self.out_proj = per_modality(lambda: nn.Linear(dim, dim))

    def forward(
        self,
        streams: list[tuple[str, torch.Tensor]],
        attn_mask: torch.Tensor | None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Attend over the concatenation of ``streams`` (plus cached keys/values).

        streams: (modality, x) pairs in sequence order, x of shape (B, T_i, D).
        attn_mask: bool (True = may attend) or additive float, broadcastable to (B, H, Tq, Tk).
        Returns the per-stream outputs and the (k, v) of this call including the cache.
        """
        qkv = [expert(self.qkv, name)(x) for name, x in streams]
        qkv = qkv[0] if len(qkv) == 1 else torch.cat(qkv, dim=1)  # (B, T, 3D)
        batch, length, _ = qkv.shape
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and CPU_BF16_ATTENTION == "matmul":
            out = _bf16_cpu_attention(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, Dh)
        out = out.transpose(1, 2)  # (B, T, H, Dh)
        outputs, start = [], 0
        for name, x in streams:
            piece = out[:, start : start + x.shape[1]].reshape(batch, x.shape[1], -1)  # (B, T_i, D)
            outputs.append(expert(self.out_proj, name)(expert(self.inner_norm, name)(piece)))
            start += x.shape[1]
        return outputs, (k, v)
