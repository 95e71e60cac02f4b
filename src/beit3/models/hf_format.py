"""The layout of the weights made for the transformers BEiT-3 pull request (huggingface/transformers
#22289, never merged), read by renaming it to the official torchscale names.

The PR names the two experts after the modality instead of ``A``/``B``
(``beit3.encoder.layers.3.self_attn.query_proj.image.weight``), spells q/k/v as
``query_proj``/``key_proj``/``value_proj``, calls the final norm ``encoder.fc_norm``, the text
embedding ``text_embedding`` and the patch projection ``vision_embedding.projection`` (``.proj`` in
early revisions), keeps the VQA pooler inside the backbone (``beit3.pooler``) and calls the heads
``classifier`` (the official ``head``), ``mlm_classifier``, ``vision_classifier`` and
``language_classifier``.

One revision of the PR's conversion script named the vision expert ``text`` and the text expert
``image``. The names are therefore never trusted: the expert whose position table has a square
grid + 3 rows (2 unused rows, CLS, the patches) is the vision one, and every key of that expert
is renamed ``A``; the other table (max text length + 2 rows) belongs to ``B``.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

import torch

from beit3.models.convert import CheckpointError

logger = logging.getLogger(__name__)

_HF_MARKERS = re.compile(
    r"^(beit3\.)?(encoder\.layers\.\d+\.self_attn\.(query|key|value)_proj\.|encoder\.embed_positions\.(image|text)\.|"
    r"text_embedding\.|vision_embedding\.)"
)
_HEADS = {"classifier": "head", "mlm_classifier": "mlm_head", "vision_classifier": "vision_head",
          "language_classifier": "language_head"}
_QKV = {"query": "q", "key": "k", "value": "v"}


def is_hf_layout(keys: Iterable[str]) -> bool:
    return any(_HF_MARKERS.match(key) for key in keys)


def vision_expert_name(state: dict[str, torch.Tensor]) -> str:
    """``"image"`` or ``"text"``: which of the file's expert names holds the vision weights, told
    by the shape of the two position tables only."""
    tables = {}
    for key, value in state.items():
        m = re.match(r"^(?:beit3\.)?encoder\.embed_positions\.(image|text)\.weight$", key)
        if m:
            tables[m[1]] = value.shape[0]
    if set(tables) != {"image", "text"}:
        raise CheckpointError("a Hugging Face BEiT-3 checkpoint needs both encoder.embed_positions.image and "
                              f".text tables to tell its experts apart; found {sorted(tables) or 'none'}")

    def is_vision(rows: int) -> bool:
        return rows > 3 and math.isqrt(rows - 3) ** 2 == rows - 3

    fits = [name for name, rows in tables.items() if is_vision(rows)]
    if len(fits) != 1:
        raise CheckpointError(
            f"cannot tell the vision expert of this Hugging Face checkpoint: its position tables have {tables} rows, "
            "and exactly one must be a square grid of patches + 3"
        )
    if fits[0] != "image":
        logger.warning("this Hugging Face checkpoint names its vision expert 'text' (position table of %d rows) "
                       "and its text expert 'image': read by table size, not by name", tables[fits[0]])
    return fits[0]


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the official names (``beit3.encoder.layers.3.self_attn.q_proj.A.weight``,
    heads ``head`` / ``mlm_head`` / ...). Unknown keys are passed on for the loader to report."""
    vision = vision_expert_name(state)
    side = {vision: "A", ("text" if vision == "image" else "image"): "B"}
    out = {}
    for key, value in state.items():
        prefix = "beit3." if key.startswith("beit3.") else ""
        inner = key[len(prefix):]
        if prefix and inner.startswith("pooler."):
            out[inner] = value  # the VQA pooler sits beside the backbone in the release
            continue
        renamed = _backbone_name(inner, side)
        if renamed is not None:
            out[prefix + renamed] = value
        elif not prefix and (head := inner.split(".", 1)[0]) in _HEADS:
            out[_HEADS[head] + inner[len(head):]] = value
        else:
            out[key] = value
    return out


def _backbone_name(key: str, side: dict[str, str]) -> str | None:
    if key == "text_embedding.weight":
        return "text_embed.weight"
    if m := re.match(r"^vision_embedding\.(?:projection|proj)\.(weight|bias)$", key):
        return f"vision_embed.proj.{m[1]}"
    if m := re.match(r"^vision_embedding\.(cls_token|mask_token)$", key):
        return f"vision_embed.{m[1]}"
    if m := re.match(r"^encoder\.embed_positions\.(image|text)\.weight$", key):
        return f"encoder.embed_positions.{side[m[1]]}.weight"
    if m := re.match(r"^encoder\.(?:fc_norm|layer_norm)\.(image|text)\.(weight|bias)$", key):
        return f"encoder.layer_norm.{side[m[1]]}.{m[2]}"
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
    if not m:
        return None
    layer, rest = m[1], m[2]
    if m := re.match(r"^self_attn\.(query|key|value)_proj\.(image|text)\.(weight|bias)$", rest):
        return f"encoder.layers.{layer}.self_attn.{_QKV[m[1]]}_proj.{side[m[2]]}.{m[3]}"
    if m := re.match(r"^(self_attn\.out_proj|self_attn\.inner_attn_ln|self_attn_layer_norm|final_layer_norm)"
                     r"\.(image|text)\.(weight|bias)$", rest):
        return f"encoder.layers.{layer}.{m[1]}.{side[m[2]]}.{m[3]}"
    if m := re.match(r"^ffn\.(image|text)\.(fc1|fc2|ffn_layernorm)\.(weight|bias)$", rest):
        return f"encoder.layers.{layer}.ffn.{side[m[1]]}.{m[2]}.{m[3]}"
    return None
