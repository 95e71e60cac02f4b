"""Reading checkpoints of every origin into our parameter names, and inferring their config.

Three layouts are recognised:

* ``official``: microsoft/unilm `.pth` files (torchscale names: ``beit3.encoder.layers.3.self_attn
  .q_proj.A.weight``; ``A`` = vision, ``B`` = text). Separate q/k/v projections are fused into
  our ``qkv`` per expert.
* ``timm``: timm's vision-only remap (``blocks.3.attn.q_proj.weight``, ``pos_embed``, no ``.A.``).
* ``beit3``: ours (``beit3.layers.3.attn.qkv.vision.weight``).

Everything is converted to the *task form*: backbone keys prefixed ``beit3.``, head keys at the
top level (the head names are the official ones, so heads need no mapping).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from beit3.config import Beit3Config

BACKBONE_PREFIX = "beit3."
_EXPERT = {"A": "vision", "B": "text"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Reading files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pt`/`.bin` pickle (read with ``weights_only=True``) or `.safetensors`.

    Official files hold the weights under ``model`` (DeepSpeed saves: ``module``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({err.__class__.__name__}: {err}). "
            "Only plain tensor checkpoints are accepted; convert other pickles with a trusted script first."
        ) from err
    if isinstance(content, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'model' or 'module')")
    return content


# ----------------------------------------------------------------------------------------------
# Layout detection and key mapping
def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(re.match(r"^(beit3\.)?encoder\.(layers|embed_positions)\.", k) for k in keys):
        return "official"
    if any(re.match(r"^(beit3\.)?layers\.\d+\.", k) or k.endswith("vision_pos_embed") for k in keys):
        return "beit3"
    if any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise CheckpointError(
        "unrecognised checkpoint layout: no 'beit3.encoder.layers.*' (official), 'beit3.layers.*' (beit3) "
        f"or 'blocks.*' (timm) keys; first keys: {keys[:5]}"
    )


def _official_backbone_key(key: str) -> str:
    """Rename one torchscale backbone key (without the ``beit3.`` prefix); q/k/v are fused later."""
    match = re.match(r"^encoder\.embed_positions\.([AB])\.weight$", key)
    if match:
        return "vision_pos_embed" if match[1] == "A" else "text_pos_embed"
    match = re.match(r"^encoder\.layer_norm\.([AB])\.(weight|bias)$", key)
    if match:
        return f"norm.{_EXPERT[match[1]]}.{match[2]}"
    match = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
    if not match:
        return key
    layer, rest = match[1], match[2]
    patterns = [
        (r"^self_attn\.out_proj\.([AB])\.(.+)$", "attn.out_proj.{e}.{p}"),
        (r"^self_attn\.inner_attn_ln\.([AB])\.(.+)$", "attn.inner_norm.{e}.{p}"),
        (r"^self_attn_layer_norm\.([AB])\.(.+)$", "norm1.{e}.{p}"),
        (r"^final_layer_norm\.([AB])\.(.+)$", "norm2.{e}.{p}"),
        (r"^ffn\.([AB])\.ffn_layernorm\.(.+)$", "ffn.{e}.norm.{p}"),
        (r"^ffn\.([AB])\.(fc[12]\..+)$", "ffn.{e}.{p}"),
        (r"^self_attn\.([qkv])_proj\.([AB])\.(.+)$", None),
    ]
    for pattern, template in patterns:
        m = re.match(pattern, rest)
        if m and template is None:
            return f"layers.{layer}.attn.{m[1]}_proj.{_EXPERT[m[2]]}.{m[3]}"  # fused below
        if m:
            return f"layers.{layer}." + template.format(e=_EXPERT[m[1]], p=m[2])
    return key


def _timm_key(key: str) -> str:
    """timm vision-only names -> our backbone names (vision experts), heads unchanged."""
    if key == "cls_token":
        return "vision_embed.cls_token"
    if key in ("pos_embed", "pos_embed.weight"):
        return "vision_pos_embed"
    if key.startswith("patch_embed."):
        return "vision_embed." + key[len("patch_embed."):]
    match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not match:
        return key
    layer, rest = match[1], match[2]
    for old, new in (("attn.inner_attn_ln.", "attn.inner_norm.vision."), ("attn.out_proj.", "attn.out_proj.vision."),
                     ("norm1.", "norm1.vision."), ("norm2.", "norm2.vision."), ("mlp.norm.", "ffn.vision.norm."),
                     ("mlp.fc1.", "ffn.vision.fc1."), ("mlp.fc2.", "ffn.vision.fc2.")):
        if rest.startswith(old):
            return f"layers.{layer}.{new}{rest[len(old):]}"
    m = re.match(r"^attn\.([qkv])_proj\.(.+)$", rest)
    if m:
        return f"layers.{layer}.attn.{m[1]}_proj.vision.{m[2]}"
    return key


def _fuse_qkv(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate separate q/k/v projections into one ``qkv`` projection per expert."""
    fused = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in backbone.items():
        m = re.match(r"^(layers\.\d+\.attn\.)([qkv])_proj\.(.+)$", key)
        if m:
            pending.setdefault(f"{m[1]}qkv.{m[3]}", {})[m[2]] = value
        else:
            fused[key] = value
    for key, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"checkpoint has only {sorted(parts)} of the q/k/v projections for {key}")
        fused[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return fused


def to_task_form(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Convert any supported layout to ours; returns (state dict, detected layout)."""
    layout = detect_layout(state)
    backbone, heads = {}, {}
    for key, value in state.items():
        if layout == "timm":
            new = _timm_key(key)
            is_backbone = new != key or key.startswith(("blocks.", "cls_token", "pos_embed", "patch_embed."))
            (backbone if is_backbone else heads)[new] = value
            continue
        if key.startswith(BACKBONE_PREFIX):
            inner = key[len(BACKBONE_PREFIX):]
            backbone[_official_backbone_key(inner) if layout == "official" else inner] = value
        elif layout == "beit3" and _is_backbone_name(key):
            backbone[key] = value  # a bare Beit3Model state dict
        elif layout == "official" and key.startswith(("encoder.", "text_embed.", "vision_embed.")):
            backbone[_official_backbone_key(key)] = value  # a bare torchscale BEiT3 state dict
        else:
            heads[key] = value
    backbone = _fuse_qkv(backbone)
    return {**{BACKBONE_PREFIX + k: v for k, v in backbone.items()}, **heads}, layout


def _is_backbone_name(key: str) -> bool:
    return key.startswith(("text_embed.", "vision_embed.", "vision_pos_embed", "text_pos_embed", "layers.", "norm."))


# ----------------------------------------------------------------------------------------------
# Config inference
def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> Beit3Config:
    """Read the architecture off the tensors of a task-form state dict.

    Heads default to hidden_size / 64, as in every released model; pass ``num_heads`` to
    override. Absent pieces (the text side of vision-only timm weights) keep base defaults.
    """
    b = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}

    def need(key: str) -> torch.Tensor:
        if key not in b:
            raise CheckpointError(f"cannot infer the architecture: the checkpoint has no '{BACKBONE_PREFIX}{key}'")
        return b[key]

    proj = need("vision_embed.proj.weight")
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid_rows = need("vision_pos_embed").shape[0] - 3
    grid = int(round(grid_rows**0.5))
    if grid * grid != grid_rows:
        raise CheckpointError(f"vision position table has {grid_rows + 3} rows: not a square grid + 3")
    layers = sorted({int(m[1]) for k in b if (m := re.match(r"^layers\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError("cannot infer the architecture: the checkpoint has no transformer layers")
    values: dict[str, Any] = dict(
        hidden_size=hidden,
        in_channels=in_channels,
        patch_size=patch,
        image_size=grid * patch,
        num_layers=layers[-1] + 1,
        num_heads=max(1, hidden // 64),
        intermediate_size=need("layers.0.ffn.vision.fc1.weight").shape[0],
        attention="decoupled" if "layers.0.attn.qkv.vision.weight" in b or "layers.0.attn.qkv.text.weight" in b
        else "shared",
        num_vl_layers=sum(f"layers.{i}.ffn.vl.fc1.weight" in b for i in layers),
        final_norm=any(k.startswith("norm.") for k in b),
    )
    if "text_embed.weight" in b:
        values["vocab_size"] = b["text_embed.weight"].shape[0]
    if "text_pos_embed" in b:
        values["max_text_positions"] = b["text_pos_embed"].shape[0]
    values.update(overrides)
    return Beit3Config.from_dict(values)
