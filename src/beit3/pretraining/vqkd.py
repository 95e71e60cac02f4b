"""VQ-KD, BEiT v2's visual tokenizer: the discrete targets of masked image modeling.

A ViT encoder turns an image into one vector per patch; a small MLP projects it to a
low-dimensional code (32-d), which is l2-normalised and replaced by the nearest entry of an
l2-normalised codebook (cosine lookup). A decoder ViT reads the code map and regresses a frozen
teacher's patch features under a cosine loss; gradients cross the lookup straight-through. The
codebook is not trained by gradients: it starts from cosine k-means on the first batch and then
follows an exponential moving average of the vectors assigned to each code; codes nobody uses
any more are restarted on vectors of the current batch (BEiT v2 has no restarts; without them a
small codebook trained on little data collapses, see ``tests/pretraining/test_vqkd.py``).

Parameter names follow ``beit2/modeling_vqkd.py`` so the released tokenizers load with
:func:`load_beitv2_tokenizer`. The teacher is not part of this module (its weights never belong in
a tokenizer checkpoint): see :mod:`beit3.pretraining.teachers`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VQKDConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    """Width of the encoder and the decoder."""
    encoder_layers: int = 12
    decoder_layers: int = 3
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    codebook_size: int = 8192
    code_dim: int = 32
    teacher_dim: int = 512
    """Width of the teacher features the decoder regresses (512: CLIP ViT-B/16's projection)."""
    decay: float = 0.99
    """EMA decay of the codebook and of the usage counts."""
    commitment_weight: float = 1.0
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0
    """Restart a code when the moving average of its hits per step falls below this (0: never,
    as BEiT v2)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def base(cls, **overrides: Any) -> "VQKDConfig":
        """The released ``vqkd_encoder_base_decoder_3x768x12_clip`` (1x: ``decoder_layers=1``)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "VQKDConfig":
        """A small tokenizer for the synthetic world and tests (32 px images, 4x4 codes)."""
        values = dict(image_size=32, patch_size=8, hidden_size=64, encoder_layers=2, decoder_layers=1,
                      num_heads=4, codebook_size=256, code_dim=16, teacher_dim=39, decay=0.9,
                      dead_code_threshold=0.05)
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# The ViT used for both encoder and decoder (beit2/modeling_finetune.py's names)


class _Attention(nn.Module):
    """Self-attention with a q and v bias but no k bias (bias = [q_bias, 0, v_bias])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # scale Dh^-0.5, as BEiT
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """CLS + learned absolute positions, pre-LN blocks, ``fc_norm`` on the patch tokens.

    Returns the (B, N, D) patch tokens (BEiT v2 builds it with mean pooling, so its final
    ``norm`` is an identity and only ``fc_norm`` exists).
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_embed.proj.stride[0], x.shape[-1] // self.patch_embed.proj.stride[1])
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._positions(grid).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table, resampled bicubically when the input grid is not the trained one."""
        if grid == (self.grid_size, self.grid_size):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patches.shape[-1]
        patches = patches.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(cls.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------
# Quantizer


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value everywhere, so every replica keeps the same codebook."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def cosine_kmeans(vectors: torch.Tensor, num_clusters: int, iters: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on l2-normalised (M, d) vectors -> (centres (K, d), cluster sizes (K,)).

    Centres start at randomly chosen vectors (with replacement only when M < K); an empty
    cluster keeps its previous centre.
    """
    count = vectors.shape[0]
    if count >= num_clusters:
        start = torch.randperm(count, generator=generator, device="cpu")[:num_clusters]
    else:
        start = torch.randint(0, count, (num_clusters,), generator=generator, device="cpu")
    centres = vectors[start.to(vectors.device)].clone()
    sizes = torch.zeros(num_clusters, device=vectors.device)
    for _ in range(max(iters, 1)):
        assign = (vectors @ centres.t()).argmax(dim=1)
        sizes = torch.bincount(assign, minlength=num_clusters).to(vectors.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        centres = torch.where(sizes[:, None] > 0, F.normalize(sums, dim=-1), centres)
    return centres, sizes


class CodebookEMA(nn.Module):
    """The codebook: ``weight`` (K, d) unit rows, updated by EMA only (no gradient)."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=-1), requires_grad=False)
        self.register_buffer("initted", torch.tensor([False]))


@dataclasses.dataclass
class QuantizerOutput:
    quantized: torch.Tensor
    """(B, N, d): the chosen codes, with straight-through gradients to the encoder output."""
    indices: torch.Tensor
    """(B, N) code ids."""
    commitment_loss: torch.Tensor
    num_restarted: int = 0


class NormEMAVectorQuantizer(nn.Module):
    """Cosine nearest-code lookup, EMA codebook, k-means init and dead-code restarts.

    ``cluster_size`` is a moving average (decay ``config.decay``) of each code's hits per step,
    updated in training mode; it drives the restarts. ``hits`` counts the hits of every forward
    (any mode) since :meth:`reset_usage`, for :meth:`usage`. ``update_codebook`` can be
    switched off to freeze the codebook even in training mode (a tokenizer used as a target
    generator must never move).
    """

    def __init__(self, config: VQKDConfig):
        super().__init__()
        self.codebook_size, self.decay = config.codebook_size, config.decay
        self.beta, self.kmeans_iters = config.commitment_weight, config.kmeans_iters
        self.dead_code_threshold = config.dead_code_threshold
        self.embedding = CodebookEMA(config.codebook_size, config.code_dim)
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("hits", torch.zeros(config.codebook_size), persistent=False)
        self.update_codebook = True

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (...) ids of the most cosine-similar codes (z need not be normalised)."""
        z = F.normalize(z.float(), dim=-1)
        return (z @ self.embedding.weight.t().float()).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = F.normalize(z.float(), dim=-1)  # (B, N, d)
        flat = z.reshape(-1, z.shape[-1]).detach()
        learning = self.training and self.update_codebook
        if learning and not bool(self.embedding.initted):
            self._kmeans_init(flat)
        indices = (z @ self.embedding.weight.t()).argmax(dim=-1)  # (B, N)
        z_q = self.embedding.weight[indices]  # (B, N, d), unit rows
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        self.hits += torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        restarted = 0
        if learning:
            restarted = self._ema_update(flat, indices.reshape(-1))
        quantized = z + (z_q - z).detach()  # straight-through
        return QuantizerOutput(quantized=quantized, indices=indices, commitment_loss=loss, num_restarted=restarted)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        centres, sizes = cosine_kmeans(flat, self.codebook_size, self.kmeans_iters)
        self.embedding.weight.copy_(_broadcast(centres.contiguous()))
        self.cluster_size.copy_(_broadcast(sizes.contiguous().float()))
        self.embedding.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> int:
        K = self.codebook_size
        counts = _all_reduce_sum(torch.bincount(indices, minlength=K).float())
        sums = _all_reduce_sum(torch.zeros_like(self.embedding.weight).index_add_(0, indices, flat))
        weight = self.embedding.weight
        candidate = torch.where(counts[:, None] > 0, F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1), weight)
        weight.copy_(F.normalize(self.decay * weight + (1 - self.decay) * candidate, dim=-1))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.dead_code_threshold <= 0:
            return 0
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        # Restart dead codes on random vectors of this batch; they get the mean usage as grace.
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = _broadcast(flat[pick].contiguous())
        weight[dead] = fresh
        self.cluster_size[dead] = self.cluster_size.mean().clamp(min=2 * self.dead_code_threshold)
        return int(dead.numel())

    def usage(self) -> float:
        """Fraction of codes hit at least once since the last :meth:`reset_usage` (all processes)."""
        return float((_all_reduce_sum(self.hits.clone()) > 0).float().mean())

    def reset_usage(self) -> None:
        self.hits.zero_()


# --------------------------------------------------------------------------------------------------
# The tokenizer


@dataclasses.dataclass
class VQKDOutput:
    loss: torch.Tensor
    """Reconstruction loss + commitment loss."""
    reconstruction_loss: torch.Tensor
    """Mean over patches of 1 - cos(decoder output, teacher feature)."""
    commitment_loss: torch.Tensor
    indices: torch.Tensor
    """(B, N) code ids."""
    num_restarted: int = 0


ValueRange = Literal["signed", "unit"]


class VQKD(nn.Module):
    """BEiT v2's vector-quantised knowledge-distillation tokenizer (teacher kept outside).

    Pixel inputs are ``value_range="signed"`` ([-1, 1], i.e. normalised with mean = std = 0.5:
    what BEiT-3's image processor produces and what BEiT v2's ``pre_process`` turns [0, 1]
    images into) or ``"unit"`` ([0, 1], what BEiT v2's data pipeline hands the tokenizer). There
    is deliberately no "max <= 1" guess as in the release.
    """

    def __init__(self, config: VQKDConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = VisionTransformer(c.image_size, c.patch_size, c.in_channels, c.hidden_size,
                                         c.encoder_layers, c.num_heads, c.mlp_ratio, c.layer_norm_eps)
        self.decoder = VisionTransformer(c.grid_size, 1, c.code_dim, c.hidden_size, c.decoder_layers,
                                         c.num_heads, c.mlp_ratio, c.layer_norm_eps)
        self.encode_task_layer = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.Tanh(),
                                               nn.Linear(c.hidden_size, c.code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.Tanh(),
                                               nn.Linear(c.hidden_size, c.teacher_dim))
        self.quantize = NormEMAVectorQuantizer(c)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for vit in (self.encoder, self.decoder):
            nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-0.04, b=0.04)
            nn.init.trunc_normal_(vit.pos_embed, std=0.02, a=-0.04, b=0.04)
            for i, block in enumerate(vit.blocks):  # BEiT's 1/sqrt(2l) rescale of the residual outputs
                with torch.no_grad():
                    block.attn.proj.weight.div_(math.sqrt(2 * (i + 1)))
                    block.mlp.fc2.weight.div_(math.sqrt(2 * (i + 1)))

    @staticmethod
    def to_signed(pixel_values: torch.Tensor, value_range: ValueRange) -> torch.Tensor:
        if value_range == "signed":
            return pixel_values
        if value_range == "unit":
            return pixel_values * 2 - 1  # BEiT v2's x / 127.5 - 1 on [0, 255]
        raise ValueError(f"value_range must be 'signed' or 'unit', got {value_range!r}")

    def encode(self, pixel_values: torch.Tensor, value_range: ValueRange = "signed") -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, code_dim) projected (not yet normalised) encoder features."""
        features = self.encoder(self.to_signed(pixel_values, value_range))
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.encode_task_layer(features.float())  # fp32, as the release

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor, value_range: ValueRange = "signed") -> torch.Tensor:
        """(B, 3, H, W) -> (B, N) visual token ids; never changes the codebook."""
        indices = self.quantize.lookup(self.encode(pixel_values, value_range))
        self.quantize.hits += torch.bincount(indices.reshape(-1), minlength=self.config.codebook_size)
        return indices

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, N, code_dim) codes -> (B, N, teacher_dim) predicted teacher features."""
        B, N, d = quantized.shape
        grid = int(math.isqrt(N))
        code_map = quantized.transpose(1, 2).reshape(B, d, grid, grid)
        return self.decode_task_layer(self.decoder(code_map))

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor,
                value_range: ValueRange = "signed") -> VQKDOutput:
        """One training step's losses. targets: (B, N, teacher_dim) teacher features per patch."""
        q = self.quantize(self.encode(pixel_values, value_range))
        prediction = self.decode(q.quantized)
        if prediction.shape != targets.shape:
            raise ValueError(f"teacher features {tuple(targets.shape)} do not match the decoder output "
                             f"{tuple(prediction.shape)}; check teacher_dim and the teacher's patch grid")
        rec = cosine_regression_loss(prediction, targets)
        return VQKDOutput(loss=rec + q.commitment_loss, reconstruction_loss=rec, commitment_loss=q.commitment_loss,
                          indices=q.indices, num_restarted=q.num_restarted)

    def no_weight_decay(self) -> set[str]:
        return {"quantize.embedding.weight", "encoder.cls_token", "encoder.pos_embed",
                "decoder.cls_token", "decoder.pos_embed"}

    def freeze(self) -> "VQKD":
        """For use as a target generator: eval mode, no gradients, codebook updates off for good."""
        self.eval()
        self.quantize.update_codebook = False
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # ----------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """``vqkd_config.json`` + ``vqkd.safetensors``."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "vqkd.safetensors"))
        (directory / "vqkd_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "VQKD":
        """Our directory format, or a released BEiT v2 ``.pth`` (see :func:`load_beitv2_tokenizer`)."""
        import json

        path = Path(path)
        if path.is_dir():
            from safetensors.torch import load_file

            config = VQKDConfig(**{**json.loads((path / "vqkd_config.json").read_text()), **overrides})
            model = cls(config)
            model.load_state_dict(load_file(str(path / "vqkd.safetensors")))
            return model
        return load_beitv2_tokenizer(torch.load(path, map_location="cpu", weights_only=True),
                                     VQKDConfig.base(**overrides))


def cosine_regression_loss(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(prediction, target) (BEiT v2's ``calculate_rec_loss``)."""
    prediction = F.normalize(prediction.float(), dim=-1)
    targets = F.normalize(targets.float(), dim=-1)
    return (1 - (prediction * targets).sum(-1)).mean()


# Keys of a released checkpoint that a teacher-free tokenizer does not have: the loss and the
# teacher (with its input scaling), which BEiT v2's loader drops as well, and two EMA statistics of
# ``EmbeddingEMA`` that its update never reads.
_DROPPED_PREFIXES = ("loss", "teacher", "scaling")
_DROPPED_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")


def convert_beitv2_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A released BEiT v2 tokenizer file's contents -> our state dict."""
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    state = {k: v for k, v in state.items()
             if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_KEYS}
    if "quantize.embedding.initted" in state:
        state["quantize.embedding.initted"] = torch.tensor([True])  # never k-means over a loaded codebook
    return state


def load_beitv2_tokenizer(checkpoint: dict[str, Any], config: VQKDConfig | None = None) -> VQKD:
    """Build a VQKD from a released BEiT v2 checkpoint (strict: every key must fit).

    The decoder depth and teacher width are read off the tensors, so the 1x and 3x decoders and
    the DINO (768-d) variant load with the default config.
    """
    state = convert_beitv2_state_dict(checkpoint)
    config = config or VQKDConfig.base()
    decoder_layers = len({k.split(".")[2] for k in state if k.startswith("decoder.blocks.")})
    changes: dict[str, Any] = {}
    if decoder_layers and decoder_layers != config.decoder_layers:
        changes["decoder_layers"] = decoder_layers
    if "decode_task_layer.2.weight" in state:
        changes["teacher_dim"] = int(state["decode_task_layer.2.weight"].shape[0])
    if "quantize.embedding.weight" in state:
        changes["codebook_size"], changes["code_dim"] = map(int, state["quantize.embedding.weight"].shape)
    if changes:
        config = dataclasses.replace(config, **changes)
    model = VQKD(config)
    state.setdefault("quantize.cluster_size", torch.zeros(config.codebook_size))
    state.setdefault("quantize.embedding.initted", torch.tensor([True]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"BEiT v2 tokenizer checkpoint does not fit: missing {missing[:10]} "
                       f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(F.normalize(model.quantize.embedding.weight, dim=-1))
    return model
