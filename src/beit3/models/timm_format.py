"""timm's BEiT-3 layout, both ways.

timm (1.0) ships ``beit3_base_patch16_224``, ``beit3_large_patch16_224`` and
``beit3_giant_patch14_{224,336}`` as plain ``VisionTransformer`` models: the vision side only,
one attention per block with fused ``qkv`` (and one ``qkv.bias``), Magneto's sub-LayerNorms as
``attn.norm`` / ``mlp.norm``, ``pos_embed`` of shape (1, N + 1, D) (the official table without its
two unused rows), ``cls_token``, and average pooling into ``fc_norm`` + ``head`` (no final
per-token norm). Its own ``checkpoint_filter_fn`` maps the official file to that layout by
keeping the ``A`` (vision) experts.

* `timm_to_task_form`: timm state dict -> our task form (vision experts, the two unused position
  rows put back as zeros). The text side is absent: it keeps its fresh initialisation.
* `to_timm_state_dict` / `save_timm_checkpoint`: our image classifier or backbone -> a file that
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)``
  loads, with the ``name`` and ``kwargs`` returned by `timm_model_args`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from beit3.config import Beit3Config
from beit3.models.convert import BACKBONE_PREFIX, CheckpointError

POSITION_OFFSET = 2  # rows 0 and 1 of the official tables are never used

# Per-block names: timm -> ours (expert "vision"; ``{e}`` is dropped for shared attention).
_BLOCK_NAMES = (
    ("norm1.", "norm1{e}."),
    ("attn.qkv.", "attn.qkv{e}."),
    ("attn.norm.", "attn.inner_norm{e}."),
    ("attn.proj.", "attn.out_proj{e}."),
    ("norm2.", "norm2.vision."),
    ("mlp.fc1.", "ffn.vision.fc1."),
    ("mlp.fc2.", "ffn.vision.fc2."),
    ("mlp.norm.", "ffn.vision.norm."),
)

#: timm's names for the released (and the paper's) widths: (hidden, patch) -> (name, depth, heads, ffn).
TIMM_MODELS = {
    (768, 16): ("beit3_base_patch16_224", 12, 12, 3072),
    (1024, 16): ("beit3_large_patch16_224", 24, 16, 4096),
    (1408, 14): ("beit3_giant_patch14_224", 40, 16, 6144),
}
TIMM_IMAGE_SIZES = {"beit3_giant_patch14_224": {336: "beit3_giant_patch14_336"}}


# ----------------------------------------------------------------------------------------------
# timm -> ours
def timm_to_task_form(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``beit3_*`` state dict in our task form (decoupled layout, vision experts).

    Keys timm's BEiT-3 does not have are passed on unchanged, so that the loader lists them.
    """
    out: dict[str, torch.Tensor] = {}
    q_v_bias: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "cls_token":
            out[BACKBONE_PREFIX + "vision_embed.cls_token"] = value
        elif key == "pos_embed":
            out[BACKBONE_PREFIX + "vision_pos_embed"] = _official_position_table(value)
        elif key.startswith("patch_embed.proj."):
            out[BACKBONE_PREFIX + "vision_embed." + key[len("patch_embed."):]] = value
        elif key.startswith("norm.") and key.count(".") == 1:
            out[BACKBONE_PREFIX + "norm.vision." + key[len("norm."):]] = value  # timm built with fc_norm=False
        elif m := re.match(r"^blocks\.(\d+)\.attn\.([qv])_bias$", key):
            q_v_bias.setdefault(m[1], {})[m[2]] = value  # the BEiT v1/v2 bias layout, for completeness
        elif m := re.match(r"^blocks\.(\d+)\.(.+)$", key):
            out[_block_key(m[1], m[2]) or key] = value
        else:
            out[key] = value  # fc_norm.*, head.* (our names), or something the loader reports
    for layer, parts in q_v_bias.items():
        if set(parts) != {"q", "v"}:
            raise CheckpointError(f"blocks.{layer}.attn has only {sorted(parts)} of q_bias / v_bias")
        key = f"{BACKBONE_PREFIX}layers.{layer}.attn.qkv.vision.bias"
        out[key] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    return out


def _block_key(layer: str, rest: str) -> str | None:
    for old, new in _BLOCK_NAMES:
        if rest.startswith(old):
            return f"{BACKBONE_PREFIX}layers.{layer}." + new.format(e=".vision") + rest[len(old):]
    return None


def _official_position_table(pos_embed: torch.Tensor) -> torch.Tensor:
    """timm's (1, N + 1, D) -> the official (N + 3, D): two zero rows in front (never read)."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"timm pos_embed has shape {tuple(pos_embed.shape)}: expected (1, N + 1, D)")
    table = pos_embed[0]
    return torch.cat([table.new_zeros(POSITION_OFFSET, table.shape[1]), table])


# ----------------------------------------------------------------------------------------------
# ours -> timm
def _parts(model) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, backbone state dict, head state dict) of an image classifier or a backbone."""
    from beit3.models import Beit3ForImageClassification, Beit3Model

    if isinstance(model, Beit3ForImageClassification):
        heads = {k: v for k, v in model.state_dict().items() if k.startswith(("fc_norm.", "head."))}
        return model.config, model.beit3.state_dict(), heads
    if isinstance(model, Beit3Model):
        return model.config, model.state_dict(), {}
    raise CheckpointError(
        f"timm's BEiT-3 models are image classifiers and vision backbones; a {type(model).__name__} has no timm "
        "form. Export its backbone instead (CLI: --task backbone)"
    )


def to_timm_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of timm's ``beit3_*`` VisionTransformer for our image classifier (or
    backbone): the vision experts only; text weights and vision-language experts are left out."""
    config, backbone, heads = _parts(model)
    if heads and config.final_norm:
        raise CheckpointError("this classifier has a final per-token LayerNorm before its pooled fc_norm; timm's "
                              "BEiT-3 has one or the other (as the release: none), so it cannot hold this model")
    if config.layer_norm_eps != 1e-5:
        raise CheckpointError(f"timm's BEiT-3 uses LayerNorm eps 1e-5; this model uses {config.layer_norm_eps}")
    shared = config.attention == "shared"
    out: dict[str, torch.Tensor] = {
        "cls_token": backbone["vision_embed.cls_token"],
        "pos_embed": backbone["vision_pos_embed"][POSITION_OFFSET:].unsqueeze(0),
        "patch_embed.proj.weight": backbone["vision_embed.proj.weight"],
        "patch_embed.proj.bias": backbone["vision_embed.proj.bias"],
    }
    for layer in range(config.num_layers):
        for timm_name, ours in _BLOCK_NAMES:
            ours = ours.format(e="" if shared else ".vision")
            for param in ("weight", "bias"):
                out[f"blocks.{layer}.{timm_name}{param}"] = backbone[f"layers.{layer}.{ours}{param}"]
    if config.final_norm:
        prefix = "norm." if shared else "norm.vision."
        out["norm.weight"], out["norm.bias"] = backbone[prefix + "weight"], backbone[prefix + "bias"]
    out.update(heads)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def timm_model_args(config: Beit3Config, num_classes: int | None) -> tuple[str, dict[str, Any]]:
    """The timm model name and the ``create_model`` keyword arguments that build the
    VisionTransformer of `to_timm_state_dict` (``num_classes=None``: a headless backbone)."""
    known = TIMM_MODELS.get((config.hidden_size, config.patch_size))
    name, depth, heads, ffn = known or ("beit3_base_patch16_224", 12, 12, 3072)
    kwargs: dict[str, Any] = {}
    default_size = 224
    if config.image_size in TIMM_IMAGE_SIZES.get(name, {}):
        name, default_size = TIMM_IMAGE_SIZES[name][config.image_size], config.image_size
    if known is None:
        kwargs.update(embed_dim=config.hidden_size, patch_size=config.patch_size)
    if config.num_layers != depth:
        kwargs["depth"] = config.num_layers
    if config.num_heads != heads:
        kwargs["num_heads"] = config.num_heads
    if config.intermediate_size != ffn:
        ratio = config.intermediate_size / config.hidden_size
        while int(config.hidden_size * ratio) < config.intermediate_size:  # timm rounds hidden * ratio down
            ratio = math.nextafter(ratio, math.inf)
        kwargs["mlp_ratio"] = ratio
    if config.image_size != default_size:
        kwargs["img_size"] = config.image_size
    if config.in_channels != 3:
        kwargs["in_chans"] = config.in_channels
    if num_classes is None:
        kwargs["num_classes"] = 0
        # No pooled fc_norm: the per-token final norm when the backbone has one, else none at all.
        if config.final_norm:
            kwargs["fc_norm"] = False
        else:
            kwargs["final_norm"] = False
    elif num_classes != 1000:
        kwargs["num_classes"] = num_classes
    return name, kwargs


def save_timm_checkpoint(model, path: str | Path) -> tuple[str, dict[str, Any]]:
    """Write `to_timm_state_dict` to ``path`` (``.safetensors``, else a ``torch.save`` pickle),
    atomically. Returns timm's model name and ``create_model`` keyword arguments; load with
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path,
    num_classes=kwargs.get("num_classes", 1000)), **kwargs)``."""
    from beit3.io import atomic_write

    state = to_timm_state_dict(model)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    num_classes = model.head.out_features if "head.weight" in state else None
    return timm_model_args(model.config, num_classes)


def timm_load_snippet(path: str | Path, name: str, kwargs: dict[str, Any]) -> str:
    """The Python line that loads a `save_timm_checkpoint` file with timm."""
    overlay = f"dict(file={str(path)!r}, num_classes={kwargs.get('num_classes', 1000)})"
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay}{extra})"
