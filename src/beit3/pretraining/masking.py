"""What masked data modeling hides: block-wise image masks and BERT-style text corruption.

Both functions work on a whole batch at once; the per-sample rules are BEiT's (images) and BERT's
(text), and the tests check them against a literal per-sample implementation of those rules.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Block:
    """One rectangle placed by the generator (for inspection and tests)."""

    image: int
    top: int
    left: int
    height: int
    width: int


class BlockMaskingGenerator:
    """BEiT's block-wise mask: rectangles of random area and aspect until the target count.

    The rules of ``beit2/masking_generator.py`` (BEiT v2, which BEiT-3 follows), for each image:
    while fewer than ``num_masking_patches`` cells are masked, take a budget
    ``b = min(remaining, max_num_patches)`` and make up to 10 tries to place one rectangle: area
    uniform in ``[min_num_patches, b]`` (Python ``random.uniform`` semantics, so the interval flips
    when ``b < min_num_patches``), log-aspect uniform in ``[log min_aspect, log max_aspect]``,
    ``h = round(sqrt(area * r))``, ``w = round(sqrt(area / r))``, both strictly smaller than the
    grid, a uniform position, accepted when it adds between 1 and ``b`` new cells. When 10 tries
    add nothing the image gives up, and the missing cells are then masked uniformly at random, so
    every mask has exactly ``num_masking_patches`` cells (BEiT v2's top-up; BEiT v1 had none).

    The batch is processed together: each try is a few numpy operations over all images still
    placing blocks, so a batch of 2048 masks on a 16 x 16 grid takes a few tens of milliseconds
    instead of one Python loop per image.

    input_size: grid (height, width) in patches, or one int for a square grid.
    num_masking_patches: cells to mask per image (40% of the grid for BEiT-3: 102 of 256).
    min_num_patches: smallest block area (BEiT: 16). max_num_patches: largest (None: the target).
    min_aspect / max_aspect: aspect range h / w (BEiT: 0.3 and 1 / 0.3).
    """

    MAX_TRIES = 10

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height < 2 or width < 2:
            raise ValueError(f"the grid must be at least 2 x 2 patches (blocks are strictly smaller), got {height} x {width}")
        if not 0 <= num_masking_patches <= height * width:
            raise ValueError(f"num_masking_patches must be in [0, {height * width}], got {num_masking_patches}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        self.height, self.width = int(height), int(width)
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def from_ratio(cls, input_size: int | tuple[int, int], mask_ratio: float, **kwargs) -> "BlockMaskingGenerator":
        """Mask ``int(mask_ratio * cells)`` cells (BEiT-3: 0.4 of 256 -> 102)."""
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        return cls((height, width), int(mask_ratio * height * width), **kwargs)

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __repr__(self) -> str:
        return (f"BlockMaskingGenerator(grid={self.height}x{self.width}, mask={self.num_masking_patches}, "
                f"block area >= {self.min_num_patches}, <= {self.max_num_patches}, "
                f"aspect {math.exp(self.log_aspect[0]):.3f}..{math.exp(self.log_aspect[1]):.3f})")

    def __call__(self, batch_size: int, generator: np.random.Generator | int | None = None) -> torch.Tensor:
        """(batch_size, H * W) bool masks, row-major (the patch order of the backbone)."""
        mask, _ = self.generate(batch_size, generator)
        return torch.from_numpy(mask.reshape(batch_size, -1))

    def generate(
        self, batch_size: int, generator: np.random.Generator | int | None = None
    ) -> tuple[np.ndarray, list[Block]]:
        """(B, H, W) bool masks and the blocks that were placed, in placement order."""
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
        H, W, target = self.height, self.width, self.num_masking_patches
        mask = np.zeros((batch_size, H, W), dtype=bool)
        count = np.zeros(batch_size, dtype=np.int64)
        placing = np.full(batch_size, target > 0)  # images still placing blocks
        rows = np.arange(H)[None, :, None]  # (1, H, 1)
        cols = np.arange(W)[None, None, :]  # (1, 1, W)
        blocks: list[Block] = []
        while placing.any():
            budget = np.minimum(target - count, self.max_num_patches)
            placed = np.zeros(batch_size, dtype=bool)
            for _ in range(self.MAX_TRIES):
                idx = np.flatnonzero(placing & ~placed)
                if idx.size == 0:
                    break
                lo, hi = float(self.min_num_patches), budget[idx].astype(np.float64)
                area = lo + (hi - lo) * rng.random(idx.size)  # random.uniform(lo, hi), either order
                aspect = np.exp(rng.uniform(*self.log_aspect, size=idx.size))
                h = np.round(np.sqrt(area * aspect)).astype(np.int64)  # numpy rounds half to even,
                w = np.round(np.sqrt(area / aspect)).astype(np.int64)  # like Python's round
                fits = (w < W) & (h < H)
                top = np.floor(rng.random(idx.size) * (H - h + 1)).astype(np.int64)
                left = np.floor(rng.random(idx.size) * (W - w + 1)).astype(np.int64)
                rect = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                        & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))  # (n, H, W)
                new = (rect & ~mask[idx]).sum(axis=(1, 2))
                accept = fits & (new > 0) & (new <= budget[idx])
                chosen = idx[accept]
                mask[chosen] |= rect[accept]
                count[chosen] += new[accept]
                placed[chosen] = True
                blocks.extend(Block(int(i), int(t), int(l), int(a), int(b))
                              for i, t, l, a, b in zip(chosen, top[accept], left[accept], h[accept], w[accept]))
            placing &= placed & (count < target)  # an image that placed nothing in 10 tries gives up
        missing = target - count
        if missing.any():
            # Top up to the exact count: mask `missing` random still-free cells of each image.
            flat = mask.reshape(batch_size, -1)
            keys = np.where(flat, np.inf, rng.random(flat.shape))
            ranks = keys.argsort(axis=1).argsort(axis=1)
            flat |= ranks < missing[:, None]
        return mask, blocks


def mask_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_prob: float,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: torch.Generator | None = None,
    min_random_id: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption for masked language modeling, over a padded batch, without a Python loop.

    In each row, of the ``n`` real tokens that are not special (BOS, EOS, padding...),
    ``clamp(round(n * mask_prob), 1, max(n - 1, 1))`` distinct ones are picked uniformly; each
    picked token becomes ``mask_token_id`` with probability 0.8, stays itself with 0.1 and becomes
    a random id in ``[min_random_id, vocab_size)`` with 0.1 — the rule of the release's captioning
    corruption (:func:`beit3.processing.processor.mask_caption_tokens`), except that special
    tokens are never picked (captioning masks EOS on purpose, so the model learns to stop).
    Rows with no maskable token are left alone.

    Returns ``(corrupted_ids, labels)``: ``labels`` holds the original id at picked positions and
    -100 elsewhere (``F.cross_entropy``'s ignore index).
    """
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    device = input_ids.device
    maskable = attention_mask.bool().clone()
    for special in set(special_ids):
        maskable &= input_ids != special
    n = maskable.sum(dim=1)  # (B,)
    count = torch.clamp(torch.floor(n.double() * mask_prob + 0.5).long(), min=1)
    count = torch.minimum(count, torch.clamp(n - 1, min=1))
    count = torch.where(n > 0, count, torch.zeros_like(count))
    keys = torch.rand(input_ids.shape, generator=generator, device=device if generator is None else generator.device)
    keys = keys.to(device).masked_fill(~maskable, 2.0)  # non-maskable positions sort last
    ranks = keys.argsort(dim=1).argsort(dim=1)
    picked = ranks < count[:, None]  # (B, T)

    draw = torch.rand(input_ids.shape, generator=generator, device=keys.device).to(device)
    random_ids = torch.randint(min_random_id, vocab_size, input_ids.shape, generator=generator,
                               device=keys.device).to(device)
    replacement = torch.where(draw < 0.8, torch.full_like(input_ids, mask_token_id),
                              torch.where(draw < 0.9, input_ids, random_ids))
    corrupted = torch.where(picked, replacement, input_ids)
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    return corrupted, labels
