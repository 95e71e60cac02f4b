"""What every BEiT-3 model shares: initialisation, optimiser metadata, saving and loading."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from beit3.io import atomic_write
from beit3.config import Beit3Config
from beit3.layers import checkpoint_blocks
from beit3.models.convert import BACKBONE_PREFIX, CheckpointError, infer_config, read_state_dict, to_task_form

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
INIT_STD = 0.02

# Parameters that are not decayed besides 1-D ones (biases, norms): positions, CLS, logit scale.
_NO_DECAY_NAMES = ("vision_pos_embed", "text_pos_embed", "cls_token", "mask_token", "logit_scale")


def trunc_normal_init(tensor: torch.Tensor, std: float = INIT_STD) -> None:
    # Truncated at +-2 std. (The official wrapper truncates at +-1 std by passing a=-std, b=std,
    # which shrinks the effective std to ~0.54 * std; we do not reproduce that.)
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def init_module(module: nn.Module, std: float = INIT_STD) -> None:
    """BEiT-style init: truncated normal (std 0.02) for weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        trunc_normal_init(module.weight, std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Beit3PreTrainedModel(nn.Module):
    """Base class: ``config``, init, ``from_pretrained`` / ``save_pretrained``, optimiser metadata.

    Task models hold the backbone as ``self.beit3`` (the official attribute name, so the
    ``beit3.`` key prefix of released checkpoints is also ours) and their heads at the top level,
    named as in the release.
    """

    #: The release's choice of a final LayerNorm for this task (None: whatever the weights have).
    official_final_norm: ClassVar[bool | None] = None
    #: Names of the linear heads with one output row per text token id, which
    #: `resize_token_embeddings` resizes together with the text embedding.
    vocab_heads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.config = config

    # ------------------------------------------------------------------------------------------
    # Initialisation
    def init_weights(self) -> None:
        """Truncated-normal init, then Magneto's gain on the branches that feed the residual.

        Magneto (sub-LN) scales fc1, fc2, the value projection and the output projection of every
        block by sqrt(ln(2L)), so that deep models train stably; torchscale does the same at
        construction. (The official fine-tuning wrapper re-initialises everything afterwards and
        so loses this scaling; we keep it.)
        """
        std = self.config.initializer_range
        self.apply(lambda module: init_module(module, std))
        for name, param in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("vision_pos_embed", "text_pos_embed", "cls_token", "mask_token"):
                trunc_normal_init(param, std)  # as BEiT; left at zero, every patch starts identical but for its pixels
        gain = self.config.magneto_gain
        dim = self.config.hidden_size
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not name.endswith("weight") or ".layers." not in f".{name}":
                    continue
                if re.search(r"\.(ffn\.\w+\.fc[12]|attn\.out_proj(\.\w+)?)\.weight$", name):
                    param.mul_(gain)
                elif re.search(r"\.attn\.qkv(\.\w+)?\.weight$", name):
                    param[2 * dim:].mul_(gain)  # the value rows of the fused projection

    # ------------------------------------------------------------------------------------------
    # Training memory
    def gradient_checkpointing_enable(self) -> None:
        """Recompute every backbone block in the backward pass instead of storing its activations.

        Same loss and gradients, less memory, about one more forward of compute. A model built
        from a config with ``gradient_checkpointing=True`` calls this at construction; the
        training engine's ``parallel.activation_checkpointing`` applies the same
        `beit3.layers.checkpoint_blocks`, and applying it twice is harmless.
        """
        checkpoint_blocks(self.backbone.layers)

    # ------------------------------------------------------------------------------------------
    # Optimiser metadata
    def no_weight_decay(self) -> set[str]:
        """Names of multi-dimensional parameters that must not be decayed (positions, CLS, scale)."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise learning-rate decay.

        0 for embeddings and positions, i + 1 for block i, num_layers + 1 for the final norm and
        the heads (the official rule, on our names).
        """
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if match:
            return int(match[1]) + 1
        if re.search(r"(?:^|\.)(text_embed|vision_embed|vision_pos_embed|text_pos_embed)(?:\.|$)", name):
            return 0
        return self.config.num_layers + 1

    @property
    def backbone(self) -> nn.Module:
        """The `Beit3Model` inside (task models keep it as ``self.beit3``)."""
        return getattr(self, "beit3", self)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the text embedding and the heads named in ``vocab_heads``, keeping old
        rows; new rows are freshly initialised."""
        backbone = self.backbone
        old = backbone.text_embed
        if vocab_size == old.num_embeddings:
            return
        new = nn.Embedding(vocab_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        init_module(new, self.config.initializer_range)
        keep = min(vocab_size, old.num_embeddings)
        with torch.no_grad():
            new.weight[:keep] = old.weight[:keep]
        backbone.text_embed = new
        for name in self.vocab_heads:
            setattr(self, name, resize_linear_rows(getattr(self, name), vocab_size))  # INIT_STD, as the heads' own init
        self.config = self.config.replace(vocab_size=vocab_size)
        if backbone is not self:
            backbone.config = self.config

    # ------------------------------------------------------------------------------------------
    # Saving and loading
    def head_args(self) -> dict[str, Any]:
        """Constructor arguments besides the config (saved in config.json)."""
        return {}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Head constructor arguments read off checkpoint tensors (e.g. the number of classes)."""
        return {}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors``; each file is replaced atomically."""
        from safetensors.torch import save_file

        from beit3.hub import model_card

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(self.config_json()))
        card = directory / "README.md"
        if not card.exists():  # a card the Hub reads; one written by the user is kept
            atomic_write(card, lambda tmp: Path(tmp).write_text(model_card(self), encoding="utf-8"))
        return directory

    def push_to_hub(self, repo_id: str, *, processor: Any = None, **options: Any) -> Any:
        """Upload this model (and ``processor``: a Beit3Processor or tokenizer) to the Hugging Face Hub
        as ``repo_id``, the folder ``save_pretrained`` writes (needs ``huggingface_hub``)."""
        from beit3.hub import push_to_hub

        return push_to_hub(self, repo_id, processor=processor, **options)

    def config_json(self) -> str:
        """The ``config.json`` of our directory format: architecture, backbone config, head arguments.
        (The training engine writes it next to its checkpoints, so they load with from_pretrained.)"""
        meta = {
            "format_version": FORMAT_VERSION,
            "architecture": type(self).__name__,
            "config": self.config.to_dict(),
            "head": self.head_args(),
        }
        return json.dumps(meta, indent=2) + "\n"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, init_head: bool = False, **overrides: Any):
        """Load our directory format or an official / timm checkpoint file.

        path: a directory written by ``save_pretrained``, or a `.pth`/`.safetensors` file.
        init_head: keep this model's freshly initialised head and ignore the checkpoint's head
            keys (fine-tuning a task from a pretrained backbone). Without it, a checkpoint that
            lacks this model's head, or has one of another shape, is an error.
        overrides: config fields (e.g. ``image_size=480``, ``drop_path_rate=0.1``,
            ``num_heads``) or head arguments (e.g. ``num_labels``).
        Raises ``CheckpointError`` listing missing, unexpected and mis-shaped keys.
        A Hub repository name (``"org/name"``) is fetched with ``huggingface_hub`` (see ``beit3.hub``).
        """
        from beit3.hub import resolve
        from beit3.models.convert import resolve_checkpoint

        # A Hub name -> its snapshot; a Hugging Face or timm folder -> its weights file, with the
        # config fields only its config.json knows (explicit overrides win).
        path, hints = resolve_checkpoint(resolve(path))
        overrides = {**hints, **overrides}
        state, layout, saved = _read_any(path)
        config_fields = set(Beit3Config.__dataclass_fields__)
        config_overrides = {k: v for k, v in overrides.items() if k in config_fields}
        head_overrides = {k: v for k, v in overrides.items() if k not in config_fields}

        if saved is not None:
            values = dict(saved["config"])
            same_head = saved.get("architecture") == cls.__name__
            head_args = dict(saved.get("head", {})) if same_head and not init_head else {}
        else:
            values = infer_config(state).to_dict()
            head_args = {} if init_head else cls.head_args_from_state_dict(state)
        if init_head and cls.official_final_norm is not None:
            values["final_norm"] = cls.official_final_norm  # the task's own choice, as the release
        config = Beit3Config.from_dict({**values, **config_overrides})
        head_args.update(head_overrides)
        model = cls(config, **head_args)
        model.load_checked_state_dict(state, init_head=init_head, vision_only=layout == "timm", source=str(path))
        return model

    def load_checked_state_dict(
        self, state: dict[str, torch.Tensor], *, init_head: bool = False, vision_only: bool = False, source: str = "checkpoint"
    ) -> None:
        """Load a task-form state dict, refusing silently wrong loads.

        The vision position table is resampled to this model's image size first (bicubic, as the
        official loader). Everything else must match exactly, except what the caller allows:
        ``init_head`` ignores head keys (and a final norm the task does not use); ``vision_only``
        accepts missing text weights (timm's vision-only files do not have them).
        """
        state = dict(state)
        is_backbone = not isinstance(getattr(self, "beit3", None), nn.Module)
        if is_backbone:  # a bare backbone: take the backbone part of any task checkpoint
            dropped = [k for k in state if not k.startswith(BACKBONE_PREFIX)]
            if dropped:
                logger.info("%s: ignoring %d head tensors for a bare backbone", source, len(dropped))
            state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        pos_key = "vision_pos_embed" if is_backbone else BACKBONE_PREFIX + "vision_pos_embed"
        expected = self.state_dict()
        if pos_key in state and pos_key in expected and state[pos_key].shape != expected[pos_key].shape:
            from beit3.layers import resize_vision_pos_embed

            grid = self.config.grid_size
            state[pos_key] = resize_vision_pos_embed(state[pos_key], (grid, grid))

        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape))
                      for k in state if k in expected and state[k].shape != expected[k].shape]

        def is_head(key: str) -> bool:
            return not is_backbone and not key.startswith(BACKBONE_PREFIX)

        def not_in_timm(key: str) -> bool:
            # timm's remap keeps only what image classification uses: no text side, no mask token.
            return bool(re.search(r"(text_embed|text_pos_embed|\.text\.|mask_token)", key))

        if init_head:
            # Every head tensor goes, also one whose name and shape match this model's (the
            # pretraining mlm_head and the captioning mlm_head, a 1000-class head reused for 1000
            # new classes): the head starts from its fresh initialisation, as the argument says.
            final_norm = (BACKBONE_PREFIX if not is_backbone else "") + "norm."
            ignored = [k for k in state if is_head(k) or (k in unexpected and k.startswith(final_norm))]
            for key in ignored:
                del state[key]
            if ignored:
                logger.info("%s: init_head=True, ignoring %d checkpoint tensors: %s", source, len(ignored), ignored[:8])
            missing = [k for k in missing if not is_head(k)]
            unexpected = [k for k in unexpected if k not in ignored]
            mismatched = [m for m in mismatched if m[0] not in ignored]
        if vision_only:
            absent = [k for k in missing if not_in_timm(k)]
            if absent:
                logger.warning("%s: vision-only weights; %d text / mask-token tensors keep their initialisation",
                               source, len(absent))
            missing = [k for k in missing if not not_in_timm(k)]
        if missing or unexpected or mismatched:
            raise CheckpointError(_mismatch_report(source, type(self).__name__, missing, unexpected, mismatched))
        self.load_state_dict(state, strict=False)


def resize_linear_rows(old: nn.Linear, rows: int, std: float = INIT_STD) -> nn.Linear:
    """A copy of ``old`` with ``rows`` outputs: the first rows kept, new ones freshly initialised."""
    new = nn.Linear(old.in_features, rows, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    init_module(new, std)
    keep = min(rows, old.out_features)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
        if old.bias is not None:
            new.bias[:keep] = old.bias[:keep]
    return new


def _mismatch_report(source: str, model: str, missing, unexpected, mismatched) -> str:
    lines = [f"{source} does not fit {model}:"]

    def section(title: str, items: list[str]) -> None:
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))

    section("missing keys", missing)
    section("unexpected keys", unexpected)
    section("mis-shaped keys", [f"{k} checkpoint {a} vs model {b}" for k, a, b in mismatched])
    lines.append("  To fine-tune a new head from a backbone checkpoint pass init_head=True (CLI: --init-head); "
                 "to change the architecture pass config overrides (e.g. image_size=, num_heads=).")
    return "\n".join(lines)


def _read_any(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """(task-form state dict, layout, saved metadata or None) from a directory or a file."""
    if path.is_dir():
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for needed in (config_file, weights_file):
            if not needed.is_file():
                raise FileNotFoundError(f"{path} is not a beit3 model directory: {needed.name} is missing")
        try:
            saved = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
        if not isinstance(saved, dict) or "config" not in saved:
            raise CheckpointError(f"{config_file}: missing the 'config' section")
        state, layout = to_task_form(read_state_dict(weights_file))
        return state, layout, saved
    state, layout = to_task_form(read_state_dict(path))
    return state, layout, None


def load_any_model(path: str | Path, **overrides: Any) -> Beit3PreTrainedModel:
    """Load a model folder or checkpoint as the class it holds (see :func:`beit3.auto.load_model`)."""
    from beit3.auto import load_model

    return load_model(path, **overrides)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
