"""`Beit3Config`: every architectural choice of a BEiT-3 backbone, as one typed dataclass.

The layout is configuration, not a fork of the code:

* ``attention="decoupled"`` is the released base/large layout: the attention projections, the
  attention sub-LayerNorm, both pre-LayerNorms and the final LayerNorm each have a vision and a
  text copy (torchscale's ``A``/``B``).
* ``attention="shared"`` is the paper's layout: one self-attention (and its LayerNorms) for all
  tokens; only the pre-FFN LayerNorm + FFN are per-modality experts.
* ``num_vl_layers`` adds a vision-language expert (its own pre-FFN LayerNorm + FFN) to the top
  layers; every token of an image-text input goes through it there (paper, giant: 3 layers).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

AttentionLayout = Literal["decoupled", "shared"]


@dataclasses.dataclass(frozen=True)
class Beit3Config:
    hidden_size: int = 768
    """Width D of every token representation."""
    num_layers: int = 12
    """Number of Multiway Transformer blocks."""
    num_heads: int = 12
    """Attention heads; every released model uses hidden_size / 64."""
    intermediate_size: int = 3072
    """Hidden width of each feed-forward expert."""
    image_size: int = 224
    """Side of the (square) training image; sets the vision position table (grid^2 + 3 rows).
    Other sizes work at run time through bicubic interpolation of that table."""
    patch_size: int = 16
    in_channels: int = 3
    vocab_size: int = 64010
    """Rows of the text embedding. The official tokenizer uses 64002 of the 64010 rows."""
    max_text_positions: int = 1024
    """Rows of the text position table; rows 0-1 are never used (fairseq numbering), so at
    most max_text_positions - 2 text tokens fit."""
    attention: AttentionLayout = "decoupled"
    num_vl_layers: int = 0
    """How many top layers have a vision-language FFN expert used by joint image-text input."""
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    """Std of the truncated-normal init of every weight matrix, embedding, position table and
    CLS token. BEiT's 0.02 is about 0.55 / sqrt(768); the tiny preset keeps that scale relative to
    its width (0.07 at 64), because at 0.02 every projection of a 64-wide model shrinks its input
    six-fold, attention starts uniform and a model trained from scratch takes thousands of steps
    to look at the right patch (a one-object colour question: 16% vs 81% after 300 steps)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the last block; block i uses linspace(0, rate, num_layers)[i]."""
    final_norm: bool = True
    """Whether a LayerNorm follows the last block (the release drops it for ImageNet and VQA)."""
    gradient_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations: a model built
    from this config calls ``gradient_checkpointing_enable()`` (`beit3.layers.checkpoint_blocks`)."""

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"Beit3Config: {message}")

        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                     "patch_size", "in_channels", "vocab_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        need(self.max_text_positions > 2, "max_text_positions must be > 2 (rows 0 and 1 are unused)")
        need(self.attention in ("decoupled", "shared"),
             f"attention must be 'decoupled' or 'shared', got {self.attention!r}")
        need(0 <= self.num_vl_layers <= self.num_layers,
             f"num_vl_layers must be in [0, num_layers={self.num_layers}], got {self.num_vl_layers}")
        need(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    # ----------------------------------------------------------------------------------------
    # Derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def vision_positions(self) -> int:
        """Rows of the vision position table: 2 unused fairseq rows + CLS + patches."""
        return self.num_patches + 3

    @property
    def max_text_length(self) -> int:
        return self.max_text_positions - 2

    @property
    def magneto_gain(self) -> float:
        """Sub-LN (Magneto) init gain sqrt(ln(2L)) for an encoder-only model."""
        return math.sqrt(math.log(2 * self.num_layers))

    # ----------------------------------------------------------------------------------------
    # Presets and serialisation
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Beit3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "Beit3Config":
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Beit3Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Beit3Config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "Beit3Config":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    @classmethod
    def load(cls, path: str | Path) -> "Beit3Config":
        path = Path(path)
        try:
            return cls.from_json_string(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


PRESETS: dict[str, dict[str, Any]] = {
    # A two-layer model for tests and the demo; same layout as the release.
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, image_size=32,
                 patch_size=8, vocab_size=1000, max_text_positions=128, initializer_range=0.07),
    # The released layout (decoupled attention, two experts, sub-LN).
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    # The paper's model: shared attention, V/L experts everywhere, VL experts in the top 3 layers.
    "giant": dict(hidden_size=1408, num_layers=40, num_heads=16, intermediate_size=6144, patch_size=14,
                  attention="shared", num_vl_layers=3),
}
