"""Attention masks as small pure functions. Convention: bool, True = the query may attend the key."""
from __future__ import annotations

import torch


def caption_attention_mask(num_image: int, num_text: int, device: torch.device | None = None) -> torch.Tensor:
    """(I+T, I+T) bool mask of the captioning recipe.

    Image tokens see all image tokens and no text; text tokens see every image token and the
    text tokens up to and including themselves, so a masked slot predicts its word from the image
    and the words to its left.
    """
    total = num_image + num_text
    allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    allowed[:num_image, num_image:] = False
    allowed[num_image:, num_image:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return allowed


def combine_attention_masks(
    key_padding: torch.Tensor | None, custom: torch.Tensor | None, num_heads: int
) -> torch.Tensor | None:
    """One mask for ``scaled_dot_product_attention`` from key padding and a user mask.

    key_padding: (B, Tk) bool, True = real token (False keys are never attended).
    custom: bool (True = may attend) or float (added to the scores; -inf blocks), shaped
        (Tq, Tk), (B, Tq, Tk) or (B, H, Tq, Tk).
    Returns None when nothing is masked, so attention takes its fastest path.
    """
    if custom is not None:
        if custom.dim() == 2:
            custom = custom[None, None]  # (1, 1, Tq, Tk)
        elif custom.dim() == 3:
            custom = custom[:, None]  # (B, 1, Tq, Tk)
        elif custom.dim() != 4:
            raise ValueError(f"attn_mask must have 2, 3 or 4 dimensions, got shape {tuple(custom.shape)}")
        if custom.dim() == 4 and custom.shape[1] not in (1, num_heads):
            raise ValueError(f"attn_mask has {custom.shape[1]} heads, the model has {num_heads}")
    if key_padding is None:
        return custom
    padding = key_padding[:, None, None, :]  # (B, 1, 1, Tk)
    if custom is None:
        return padding
    if custom.dtype == torch.bool:
        return custom & padding
    return custom.masked_fill(~padding, float("-inf"))
