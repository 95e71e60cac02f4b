"""The torchscale 0.3.0 BEiT3 (the released backbone), used as a test-only reference."""
from __future__ import annotations

import warnings

import pytest
import torch

from beit3.models.convert import to_task_form

TINY = dict(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4, encoder_ffn_embed_dim=256,
            img_size=32, patch_size=8, vocab_size=100, multiway=True, no_output_layer=True, drop_path_rate=0.0)


def torchscale_beit3(randomize: bool = True, normalize_output: bool = True, **overrides):
    """A torchscale BEiT3 with every parameter (LayerNorms and positions included) randomised,
    so that any mix-up of experts, tables or norms shows up as a difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("torchscale", reason="reference tests need torchscale 0.3.0 (make test installs it)")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    config = EncoderConfig(**{**TINY, **overrides})
    config.normalize_output = normalize_output
    model = BEiT3(config).eval()
    if randomize:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    return model


def official_checkpoint(tmp_path, backbone, heads: dict | None = None, key: str = "model"):
    """Write a state dict the way the release does: {'model': {'beit3.<backbone key>': ..., <head keys>}}."""
    state = {f"beit3.{k}": v.clone() for k, v in backbone.state_dict().items()}
    state.update(heads or {})
    path = tmp_path / "official.pth"
    torch.save({key: state}, path)
    return path


def official_names(backbone) -> dict[str, torch.Tensor]:
    """Our backbone state dict written back with torchscale names (q/k/v split), for fixtures."""
    out = {}
    dim = backbone.config.hidden_size
    side = {"vision": "A", "text": "B"}
    for key, value in backbone.state_dict().items():
        parts = key.split(".")
        if key == "vision_pos_embed":
            out["encoder.embed_positions.A.weight"] = value
        elif key == "text_pos_embed":
            out["encoder.embed_positions.B.weight"] = value
        elif parts[0] == "norm":
            out[f"encoder.layer_norm.{side[parts[1]]}.{parts[2]}"] = value
        elif parts[0] == "layers":
            i, rest = parts[1], parts[2:]
            if rest[:2] == ["attn", "qkv"]:
                for name, chunk in zip("qkv", value.split(dim)):
                    out[f"encoder.layers.{i}.self_attn.{name}_proj.{side[rest[2]]}.{rest[3]}"] = chunk
            elif rest[:2] == ["attn", "out_proj"]:
                out[f"encoder.layers.{i}.self_attn.out_proj.{side[rest[2]]}.{rest[3]}"] = value
            elif rest[:2] == ["attn", "inner_norm"]:
                out[f"encoder.layers.{i}.self_attn.inner_attn_ln.{side[rest[2]]}.{rest[3]}"] = value
            elif rest[0] == "norm1":
                out[f"encoder.layers.{i}.self_attn_layer_norm.{side[rest[1]]}.{rest[2]}"] = value
            elif rest[0] == "norm2":
                out[f"encoder.layers.{i}.final_layer_norm.{side[rest[1]]}.{rest[2]}"] = value
            elif rest[0] == "ffn":
                sub = "ffn_layernorm" if rest[2] == "norm" else rest[2]
                out[f"encoder.layers.{i}.ffn.{side[rest[1]]}.{sub}.{rest[3]}"] = value
        else:
            out[key] = value
    assert to_task_form({f"beit3.{k}": v for k, v in out.items()})[1] == "official"
    return out
