"""Reading checkpoints of every origin into our parameter names, and inferring their config.

Four layouts are recognised:

* ``official``: microsoft/unilm `.pth` files (torchscale names: ``beit3.encoder.layers.3.self_attn
  .q_proj.A.weight``; ``A`` = vision, ``B`` = text). Separate q/k/v projections are fused into
  our ``qkv`` per expert.
* ``hf``: the weights made for the transformers BEiT-3 pull request (``beit3.encoder.layers.3
  .self_attn.query_proj.image.weight``, heads ``classifier`` / ``mlm_classifier`` / ...): renamed
  to the official names first (`beit3.models.hf_format`).
* ``timm``: timm's ``beit3_*`` VisionTransformers (``blocks.3.attn.qkv.weight``, ``pos_embed``
  of N + 1 rows): vision only (`beit3.models.timm_format`, which also writes that layout).
* ``beit3``: ours (``beit3.layers.3.attn.qkv.vision.weight``).

Everything is converted to the *task form*: backbone keys prefixed ``beit3.``, head keys at the
top level, named as in the official release.
"""
from __future__ import annotations

import json
import math
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
    """Tensors of a PyTorch file (`.pth`/`.pt`/`.bin`, read with ``weights_only=True``) or a
    safetensors file, told apart by their first bytes rather than by the file name.

    Official files hold the weights under ``model`` (DeepSpeed saves: ``module``). Anything else
    (a text file, a download cut short, a pickle of arbitrary objects) raises a one-line
    ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    kind, head = _sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: a damaged or truncated safetensors file ({_first_line(err)})") from None
    if kind == "broken-zip":
        raise CheckpointError(f"{path}: a damaged or truncated PyTorch checkpoint (its zip archive is incomplete); "
                              "download or copy it again")
    if kind is None:
        starts = "the file is empty" if not head else f"the file starts with {head[:12]!r}"
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint ({starts}); pass a "
                              ".pth/.bin/.safetensors weights file or a model folder")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        if "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors and is refused: checkpoints are read with "
                "torch.load(weights_only=True), which runs no code; save a plain state dict of tensors instead"
            ) from None
        raise CheckpointError(f"{path}: a damaged or truncated PyTorch checkpoint ({err.__class__.__name__}"
                              f"{': ' + _first_line(err) if str(err) else ''}); download or copy it again") from None
    if isinstance(content, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'model' or 'module')")
    return content


def _sniff(path: Path) -> tuple[str | None, bytes]:
    """The kind of file by its first bytes: 'zip' / 'broken-zip' (PyTorch's format), 'pickle'
    (PyTorch's legacy format), 'safetensors', or None for anything else; and those bytes."""
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return ("zip" if zipfile.is_zipfile(path) else "broken-zip"), head
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save(_use_new_zipfile_serialization=False)
        return "pickle", head
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors", head  # 8-byte little-endian header length, then the JSON header
    return None, head


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else err.__class__.__name__


# ----------------------------------------------------------------------------------------------
# Layout detection and key mapping
def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    from beit3.models.hf_format import is_hf_layout

    if is_hf_layout(keys):
        return "hf"
    if any(re.match(r"^(beit3\.)?encoder\.(layers|embed_positions)\.", k) for k in keys):
        return "official"
    if any(re.match(r"^(beit3\.)?layers\.\d+\.", k) or k.endswith("vision_pos_embed") for k in keys):
        return "beit3"
    if any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise CheckpointError(
        "unrecognised checkpoint layout: no 'beit3.encoder.layers.*' (official), 'beit3.layers.*' (beit3), "
        "'beit3.encoder.layers.*.self_attn.query_proj.*' (Hugging Face) or 'blocks.*' (timm) keys; "
        f"first keys: {keys[:5]}"
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
    """Convert any supported layout to ours; returns (state dict, detected layout).

    Layouts: ``official`` (torchscale names), ``hf`` (the transformers BEiT-3 PR; renamed to
    the official names first), ``timm`` (timm's ``beit3_*`` VisionTransformers: vision only),
    ``beit3`` (ours).
    """
    layout = detect_layout(state)
    if layout == "timm":
        from beit3.models.timm_format import timm_to_task_form

        return timm_to_task_form(state), layout
    if layout == "hf":
        from beit3.models.hf_format import hf_to_official

        state = hf_to_official(state)
    backbone, heads = {}, {}
    for key, value in state.items():
        if key.startswith(BACKBONE_PREFIX):
            inner = key[len(BACKBONE_PREFIX):]
            backbone[_official_backbone_key(inner) if layout != "beit3" else inner] = value
        elif layout == "beit3" and _is_backbone_name(key):
            backbone[key] = value  # a bare Beit3Model state dict
        elif layout != "beit3" and key.startswith(("encoder.", "text_embed.", "vision_embed.")):
            backbone[_official_backbone_key(key)] = value  # a bare torchscale BEiT3 state dict
        else:
            heads[key] = value
    backbone = _fuse_qkv(backbone)
    return {**{BACKBONE_PREFIX + k: v for k, v in backbone.items()}, **heads}, layout


def _is_backbone_name(key: str) -> bool:
    return key.startswith(("text_embed.", "vision_embed.", "vision_pos_embed", "text_pos_embed", "layers.", "norm."))


# ----------------------------------------------------------------------------------------------
# Folders of other libraries
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pth")


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """What ``from_pretrained`` should read for ``path``, and config fields only a foreign
    ``config.json`` knows (the number of heads).

    * a file, or one of our folders (``config.json`` with a ``config`` section): itself, ``{}``;
    * a Hugging Face folder (``config.json`` with ``num_attention_heads``, weights in
      ``model.safetensors`` or ``pytorch_model.bin``): the weights file and ``num_heads`` /
      ``layer_norm_eps`` from its config;
    * a timm folder (``config.json`` naming a ``beit3_*`` architecture) or a folder of one
      weights file: that file, ``{}``.
    """
    path = Path(path)
    if not path.is_dir():
        return path, {}
    config_file = path / "config.json"
    meta: Any = None
    if config_file.is_file():
        try:
            meta = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
        if isinstance(meta, dict) and "config" in meta:
            return path, {}  # ours
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
            raise CheckpointError(f"{path}: sharded checkpoints are not supported; merge the shards into one file")
        if meta is None:
            raise FileNotFoundError(f"{path} is not a model folder: config.json is missing")
        raise FileNotFoundError(f"{path} has a config.json but no weights file (looked for {', '.join(WEIGHT_FILES)})")
    hints: dict[str, Any] = {}
    if isinstance(meta, dict):
        if isinstance(meta.get("num_attention_heads"), int):
            hints["num_heads"] = meta["num_attention_heads"]
        if isinstance(meta.get("layer_norm_eps"), (int, float)):
            hints["layer_norm_eps"] = float(meta["layer_norm_eps"])
    return weights[0], hints


def load_pretrained(cls, path: str | Path, *, init_head: bool = False, **overrides: Any):
    """``cls.from_pretrained`` for every source, also the folders of other libraries (a Hugging
    Face BEiT-3 folder, a timm folder): see `resolve_checkpoint`. Overrides win over what the
    foreign ``config.json`` says."""
    target, hints = resolve_checkpoint(path)
    return cls.from_pretrained(target, init_head=init_head, **{**hints, **overrides})


# ----------------------------------------------------------------------------------------------
# Config inference
def _heads_for_width(hidden: int) -> int:
    """hidden / 64 (base, large), except the paper's giant width: 1408 with 16 heads of 88."""
    from beit3.config import PRESETS

    giant = PRESETS["giant"]
    return giant["num_heads"] if hidden == giant["hidden_size"] else max(1, hidden // 64)


def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> Beit3Config:
    """Read the architecture off the tensors of a task-form state dict.

    Heads default to hidden_size / 64, as in every released model (16 for the giant width
    1408, as the paper and timm); pass ``num_heads`` to override. Absent pieces (the text side
    of vision-only timm weights) keep base defaults.
    """
    b = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}

    def need(key: str) -> torch.Tensor:
        if key not in b:
            raise CheckpointError(f"cannot infer the architecture: the checkpoint has no '{BACKBONE_PREFIX}{key}'")
        return b[key]

    proj = need("vision_embed.proj.weight")
    if proj.dim() != 4:
        raise CheckpointError(f"vision_embed.proj.weight has shape {tuple(proj.shape)}: expected a 4-d patch convolution")
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    rows = need("vision_pos_embed").shape[0]
    grid = math.isqrt(max(rows - 3, 0))
    if rows <= 3 or grid * grid != rows - 3:
        raise CheckpointError(f"the vision position table has {rows} rows: expected a square grid of patches + 3 "
                              "(2 unused rows, then CLS)")
    layers = sorted({int(m[1]) for k in b if (m := re.match(r"^layers\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError("cannot infer the architecture: the checkpoint has no transformer layers")
    values: dict[str, Any] = dict(
        hidden_size=hidden,
        in_channels=in_channels,
        patch_size=patch,
        image_size=grid * patch,
        num_layers=layers[-1] + 1,
        num_heads=_heads_for_width(hidden),
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
