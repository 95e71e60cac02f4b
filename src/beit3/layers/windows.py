"""Non-overlapping attention windows over a patch grid (ViTDet), as a pair of pure reshapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, D) -> (B * windows, window * window, D), zero-padding H and W to multiples.

    Also returns the (rows, cols) of windows, which `window_merge` needs to undo the split. The
    padding tokens are zeros and are attended like the others (as ViTDet does).
    """
    batch, height, width, dim = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // window, (width + pad_w) // window
    x = x.view(batch, rows, window, cols, window, dim).permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, w, w, D)
    return x.reshape(batch * rows * cols, window * window, dim), (rows, cols)


def window_merge(x: torch.Tensor, grid: tuple[int, int], window: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * windows, window * window, D) -> (B, H, W, D), padding dropped."""
    rows, cols = grid
    dim = x.shape[-1]
    x = x.view(-1, rows, cols, window, window, dim).permute(0, 1, 3, 2, 4, 5)  # (B, rows, w, cols, w, D)
    return x.reshape(-1, rows * window, cols * window, dim)[:, : size[0], : size[1]]
