"""Turning pixels into tokens, and position tables."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows 0 and 1 of both position tables are never used: torchscale numbers positions from 2, as
# fairseq does, and released weights are laid out that way.
POSITION_OFFSET = 2


class VisionEmbedding(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv), with a CLS token in front.

    ``mask_token`` replaces the patches chosen by masked image modeling (pretraining only).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> tokens (B, 1 + H/P * W/P, D), patches in raster order."""
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        if image_mask is not None:
            x = torch.where(image_mask[..., None], self.mask_token.to(x.dtype), x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)


def resize_vision_pos_embed(table: torch.Tensor, new_grid: tuple[int, int], num_extra: int = 3) -> torch.Tensor:
    """Resample a vision position table to another patch grid (bicubic, as the official loader).

    table: (num_extra + g*g, D) with a square training grid g. The leading ``num_extra`` rows
    (2 unused fairseq rows + CLS) are kept as they are; the grid rows are reshaped to (g, g),
    resized to ``new_grid`` = (rows, cols) and flattened back in raster order.
    """
    extra, grid = table[:num_extra], table[num_extra:]
    side = int(round(grid.shape[0] ** 0.5))
    if side * side != grid.shape[0]:
        raise ValueError(f"position table has {grid.shape[0]} grid rows, which is not a square grid")
    if (side, side) == tuple(new_grid):
        return table
    dim = table.shape[1]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(-1, dim)  # (rows*cols, D)
    return torch.cat([extra, grid], dim=0)
