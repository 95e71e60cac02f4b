"""Teachers whose patch features VQ-KD learns to reconstruct.

A teacher maps images in [0, 1] (B, 3, H, W) to one feature vector per patch (B, N, dim), on the
tokenizer's patch grid. Two kinds:

* :class:`HOGTeacher` — built in, no weights: each patch's mean colour and a histogram of
  oriented gradients (HOG) over its sub-cells. See docs/pretraining.md for why this one.
* :class:`TimmTeacher` — any frozen timm image model whose weights the user has as a local file;
  CLIP ViT-B/16 (``vit_base_patch16_clip_224.openai`` with ``num_classes=512``, so that timm's
  head is CLIP's visual projection) reproduces BEiT v2's target: ``ln_post`` patch tokens times
  ``visual.proj``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HOGTeacher(nn.Module):
    """Per-patch colour + gradient-orientation histogram, computed with fixed convolutions.

    For each patch: its mean RGB mapped to [-1, 1] (3 values) and, for each of ``cells x cells``
    sub-cells, a ``bins``-bin histogram of unsigned gradient orientations weighted by gradient
    magnitude (soft-assigned to the two nearest bins). The histograms of a patch are
    l2-normalised together (HOG's block normalisation) and centred, so a cosine between two
    patches compares the *shape* of their edge distributions rather than their contrast.
    dim = 3 + cells^2 * bins (39 with the defaults).
    """

    def __init__(self, patch_size: int, bins: int = 9, cells: int = 2):
        super().__init__()
        if patch_size % cells:
            raise ValueError(f"patch_size {patch_size} is not divisible into {cells} x {cells} cells")
        self.patch_size, self.bins, self.cells = patch_size, bins, cells
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.register_buffer("kx", kernel.view(1, 1, 1, 3), persistent=False)
        self.register_buffer("ky", kernel.view(1, 1, 3, 1), persistent=False)

    @property
    def dim(self) -> int:
        return 3 + self.cells**2 * self.bins

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images.shape
        p, c = self.patch_size, self.cells
        gh, gw = H // p, W // p
        colour = F.avg_pool2d(images.float(), p) * 2 - 1  # (B, 3, gh, gw)

        gray = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
        gx = F.conv2d(F.pad(gray, (1, 1, 0, 0), mode="replicate"), self.kx)
        gy = F.conv2d(F.pad(gray, (0, 0, 1, 1), mode="replicate"), self.ky)
        magnitude = torch.sqrt(gx**2 + gy**2)
        angle = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
        position = angle / math.pi * self.bins - 0.5  # bin centres at (k + 0.5) * pi / bins
        low = torch.floor(position)
        frac = position - low
        bins = torch.arange(self.bins, device=images.device).view(1, -1, 1, 1)
        low_bin, high_bin = low.long() % self.bins, (low.long() + 1) % self.bins
        votes = magnitude * ((bins == low_bin) * (1 - frac) + (bins == high_bin) * frac)  # (B, bins, H, W)
        hist = F.avg_pool2d(votes, p // c)  # (B, bins, gh * c, gw * c)
        hist = hist.view(B, self.bins, gh, c, gw, c).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, c * c * self.bins)
        hist = F.normalize(hist, dim=-1)
        hist = hist - hist.mean(dim=-1, keepdim=True)
        return torch.cat([colour.flatten(2).transpose(1, 2), hist], dim=-1)  # (B, N, dim)


class TimmTeacher(nn.Module):
    """A frozen timm model's patch tokens (prefix tokens dropped), optionally through its head.

    model_name: a timm architecture (built with ``pretrained=False``; nothing is downloaded).
    checkpoint: a local state-dict file for it (``.pth``/``.bin``/``.safetensors``).
    input_size: the side the teacher sees (images are resized bicubically); its patch grid must
        equal the tokenizer's.
    apply_head: project every patch token with ``model.head`` (CLIP's ``visual.proj`` in timm).
    mean / std: the teacher's own normalisation (CLIP's by default).
    model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(self, model_name: str, checkpoint: str | Path | None, *, input_size: int = 224,
                 num_classes: int = 0, apply_head: bool = False,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD, **model_kwargs: Any):
        super().__init__()
        import timm

        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
        if checkpoint is not None:
            state = _read_weights(Path(checkpoint))
            self.model.load_state_dict(state)
        self.model.eval().requires_grad_(False)
        self.input_size, self.apply_head = input_size, apply_head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "TimmTeacher":
        super().train(mode)
        self.model.eval()  # always frozen
        return self

    @property
    def dim(self) -> int:
        return self.model.num_classes if self.apply_head and self.model.num_classes else self.model.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        tokens = self.model.forward_features((images - self.mean) / self.std)
        tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 1):]
        if self.apply_head:
            tokens = self.model.head(tokens)
        return tokens


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state
