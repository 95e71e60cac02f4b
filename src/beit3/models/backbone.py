"""The Multiway Transformer backbone, `Beit3Model`.

Tokens of each modality travel as their own stream (vision first, then text) through every
block. A block runs each stream through that modality's experts and joins the streams only
inside attention, where every token attends over the whole sequence. Routing is therefore
explicit — which expert serves which tokens is decided by the stream's name — and no split or
concatenation of the hidden states is needed between blocks.
"""
from __future__ import annotations

import os

from collections.abc import Collection, Sequence
from typing import Literal

import torch
from torch import nn

from beit3.config import Beit3Config
from beit3.layers import (
    Attention,
    Experts,
    FeedForward,
    KVCache,
    VisionEmbedding,
    combine_attention_masks,
    drop_path_mask,
    expert,
    resize_vision_pos_embed,
    window_merge,
    window_partition,
)
from beit3.layers.embeddings import POSITION_OFFSET
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.outputs import Beit3ModelOutput


class Block(nn.Module):
    """Pre-LN attention + pre-LN feed-forward experts, each branch with Magneto's sub-LN."""

    def __init__(self, config: Beit3Config, drop_path: float, has_vl_expert: bool):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        decoupled = config.attention == "decoupled"

        def layer_norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, eps=eps)

        ffn_experts = ("vision", "text", "vl") if has_vl_expert else ("vision", "text")
        self.norm1 = Experts(layer_norm) if decoupled else layer_norm()
        self.attn = Attention(dim, config.num_heads, eps, decoupled)
        self.norm2 = Experts(layer_norm, ffn_experts)
        self.ffn = Experts(lambda: FeedForward(dim, config.intermediate_size, eps), ffn_experts)
        self.drop_path = drop_path
        self.has_vl_expert = has_vl_expert
        # The rate again as a (non-saved) tensor, read only while compiling: a float attribute is a
        # constant of the traced graph, so blocks of different rates would each compile their own;
        # as a buffer it is an input, and every block with drop path shares one graph.
        self.has_drop_path = drop_path > 0
        self.register_buffer("drop_path_rate", torch.tensor(float(drop_path)), persistent=False)

    def forward(
        self,
        vision: torch.Tensor | None,
        text: torch.Tensor | None,
        *,
        joint: bool,
        attn_mask: torch.Tensor | None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """vision (B, Tv, D) and/or text (B, Tt, D) -> the same shapes, plus this layer's (k, v).

        joint: the sequence holds an image and text (also when the image sits in ``past_kv``);
            the top layers then send every token through their vision-language expert.
        """
        streams = [(name, x) for name, x in (("vision", vision), ("text", text)) if x is not None]
        if torch.compiler.is_compiling():
            rate = self.drop_path_rate if self.training and self.has_drop_path else 0.0
        else:
            rate = self.drop_path
        keep = drop_path_mask(streams[0][1].shape[0], rate, self.training, streams[0][1])

        attended, kv = self.attn([(name, expert(self.norm1, name)(x)) for name, x in streams], attn_mask, past_kv)
        outputs = []
        for (name, x), a in zip(streams, attended):
            x = x + (a if keep is None else a * keep)
            ffn_name = "vl" if joint and self.has_vl_expert else name
            h = self.ffn[ffn_name](self.norm2[ffn_name](x))
            outputs.append(x + (h if keep is None else h * keep))
        result = dict(zip((name for name, _ in streams), outputs))
        return result.get("vision"), result.get("text"), kv


def take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices in timm's convention: None = all, n = the last n, a sequence = those blocks
    (negative ones count from the end). Returned sorted, in the order the blocks run."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; the model has {depth}")
        return list(range(depth - indices, depth))
    chosen = set()
    for index in indices:
        if not -depth <= index < depth:
            raise ValueError(f"block index {index} is out of range for {depth} blocks")
        chosen.add(index % depth)
    return sorted(chosen)


def host_checks(tensor: torch.Tensor) -> bool:
    """Whether checks that read tensor values may run: in eager mode on CPU tensors, where reading
    costs no device synchronisation, or anywhere with ``BEIT3_CHECK_INPUTS=1`` (debugging). Never
    while ``torch.compile``/``torch.export`` trace, so the model stays one graph."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or _CHECK_INPUTS


_CHECK_INPUTS = os.environ.get("BEIT3_CHECK_INPUTS", "") not in ("", "0")


class Beit3Model(Beit3PreTrainedModel):
    """BEiT-3 backbone: images and text in, one hidden state per token out.

    Inputs (each optional, at least one of ``pixel_values`` / ``input_ids``):

    * ``pixel_values`` (B, C, H, W): H and W multiples of the patch size. Sizes other than the
      config's work: the vision position table is resampled bicubically.
    * ``input_ids`` (B, T) and ``attention_mask`` (B, T): 1 for real tokens, 0 for padding.
    * ``image_mask`` (B, N) bool: patches replaced by the mask token (masked image modeling).
    * ``attn_mask``: an extra attention mask over the whole sequence (image tokens first). A bool
      mask means True = the query may attend the key; a float mask is added to the attention
      scores (use ``-inf`` to block). Shape (T, T), (B, T, T) or (B, heads, T, T). It is combined
      with the padding of ``attention_mask``. (The official model turns a bool mask into +1
      instead of blocking; here both dtypes do what they say.)
    * ``past_key_values`` / ``use_cache``: incremental decoding (captioning).
    * ``text_position_offset``: where the text's positions start (incremental decoding).

    Image tokens come first: [CLS, patch_1..patch_N, text_1..text_T]. Each modality numbers its
    positions from row 2 of its own table, so text positions restart in joint inputs exactly as
    in the released weights.
    """

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        dim = config.hidden_size
        self.text_embed = nn.Embedding(config.vocab_size, dim)
        self.vision_embed = VisionEmbedding(config.patch_size, config.in_channels, dim)
        self.vision_pos_embed = nn.Parameter(torch.zeros(config.vision_positions, dim))
        self.text_pos_embed = nn.Parameter(torch.zeros(config.max_text_positions, dim))
        depth = config.num_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, L)
        first_vl = config.num_layers - config.num_vl_layers
        self.layers = nn.ModuleList(
            Block(config, drop_path=rate, has_vl_expert=i >= first_vl) for i, rate in enumerate(rates)
        )
        if config.final_norm:
            def layer_norm() -> nn.LayerNorm:
                return nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.norm = Experts(layer_norm) if config.attention == "decoupled" else layer_norm()
        else:
            self.norm = None
        self.init_weights()
        if config.gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ------------------------------------------------------------------------------------------
    def embed_image(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) tokens with their positions added."""
        config = self.config
        grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
        x = self.vision_embed(pixel_values, image_mask)
        table = resize_vision_pos_embed(self.vision_pos_embed, grid)
        return x + table[POSITION_OFFSET : POSITION_OFFSET + x.shape[1]].to(x.dtype)

    def embed_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_offset: int = 0
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) with positions; padded tokens are zeroed as in the release."""
        start = POSITION_OFFSET + position_offset
        x = self.text_embed(input_ids) + self.text_pos_embed[start : start + input_ids.shape[1]]
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return x

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        text_position_offset: int = 0,
        output_hidden_states: bool = False,
    ) -> Beit3ModelOutput:
        self._check_inputs(pixel_values, input_ids, attention_mask, image_mask, text_position_offset)
        vision = self.embed_image(pixel_values, image_mask) if pixel_values is not None else None
        text = self.embed_text(input_ids, attention_mask, text_position_offset) if input_ids is not None else None
        joint = text is not None and (vision is not None or (past_key_values is not None and past_key_values.joint))
        mask = combine_attention_masks(
            self._key_padding(vision, attention_mask, past_key_values), attn_mask, self.config.num_heads
        )

        hidden_states = [self._join(vision, text)] if output_hidden_states else None
        cache = []
        for index, block in enumerate(self.layers):
            past = past_key_values.layers[index] if past_key_values is not None else None
            vision, text, kv = block(vision, text, joint=joint, attn_mask=mask, past_kv=past)
            if use_cache:
                cache.append(kv)
            if output_hidden_states:
                hidden_states.append(self._join(vision, text))

        if self.norm is not None:
            vision = expert(self.norm, "vision")(vision) if vision is not None else None
            text = expert(self.norm, "text")(text) if text is not None else None
        return Beit3ModelOutput(
            last_hidden_state=self._join(vision, text),
            vision_len=0 if vision is None else vision.shape[1],
            hidden_states=hidden_states,
            past_key_values=KVCache(cache, joint=joint) if use_cache else None,
        )

    # ------------------------------------------------------------------------------------------
    # The vision backbone API of timm, for image classifiers and dense-prediction heads
    def forward_features(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D): CLS and patch tokens after the final norm (V experts only)."""
        return self(pixel_values=pixel_values, image_mask=image_mask).last_hidden_state

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
        keep_cls_token: bool = True,
        window_size: int = 0,
        global_blocks: Collection[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The vision-only pass, also returning the outputs of chosen blocks (timm's conventions).

        indices: which blocks to return, see `take_indices` (None: all; 1: the last).
        norm: pass each returned block output through the final norm too (when the model has one).
        output_fmt: ``"NCHW"``: patch maps (B, D, H/P, W/P); ``"NLC"``: patch tokens (B, N, D).
            Either way the CLS token is left out of the intermediates, as in timm.
        intermediates_only: return only the list, and run no block after the last one asked for.
        keep_cls_token: False drops the CLS token before the first block, as ViTDet has none: the
            patches then only see each other, and the final output is (B, N, D).
        window_size: with W > 0, every block not in ``global_blocks`` attends only within
            non-overlapping W x W windows of patches (ViTDet); the grid is zero-padded to
            multiples of W inside those blocks. Needs ``keep_cls_token=False``: the CLS token
            belongs to no window.
        global_blocks: indices of the blocks that attend over the whole image when windowing.

        Returns ``(final, intermediates)``, ``final`` being the last block's output after the
        final norm ((B, 1 + N, D), as `forward_features`), or the intermediates alone.
        """
        self._check_inputs(pixel_values, None, None, image_mask, 0)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        if window_size and keep_cls_token:
            raise ValueError("windowed attention needs keep_cls_token=False: the CLS token belongs to no window")
        depth = len(self.layers)
        if any(not 0 <= index < depth for index in global_blocks):
            raise ValueError(f"global_blocks {sorted(global_blocks)} are not all in [0, {depth})")
        wanted = take_indices(depth, indices)
        last = wanted[-1] if intermediates_only else depth - 1
        patch = self.config.patch_size
        rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        final_norm = expert(self.norm, "vision") if self.norm is not None else nn.Identity()

        x = self.embed_image(pixel_values, image_mask)  # (B, 1 + N, D)
        if not keep_cls_token:
            x = x[:, 1:]  # (B, N, D)
        batch, _, dim = x.shape
        intermediates = []
        for index, block in enumerate(self.layers[: last + 1]):
            if window_size and index not in global_blocks:
                windows, grid = window_partition(x.view(batch, rows, cols, dim), window_size)  # (B * windows, W * W, D)
                windows, _, _ = block(windows, None, joint=False, attn_mask=None)
                x = window_merge(windows, grid, window_size, (rows, cols)).reshape(batch, -1, dim)
            else:
                x, _, _ = block(x, None, joint=False, attn_mask=None)
            if index in wanted:
                intermediates.append(final_norm(x) if norm else x)

        if keep_cls_token:
            intermediates = [y[:, 1:] for y in intermediates]  # (B, N, D)
        if output_fmt == "NCHW":
            # A view in channels-last memory order (no copy), as the dense heads have always received it.
            intermediates = [y.transpose(1, 2).reshape(batch, dim, rows, cols) for y in intermediates]
        if intermediates_only:
            return intermediates
        return final_norm(x), intermediates

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _join(vision: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        if vision is None:
            return text
        if text is None:
            return vision
        return torch.cat([vision, text], dim=1)

    @staticmethod
    def _key_padding(
        vision: torch.Tensor | None, attention_mask: torch.Tensor | None, past: KVCache | None
    ) -> torch.Tensor | None:
        """(B, Tk) bool, True = real key; None when nothing is padded (the fast attention path).

        Whether anything is padded is only asked where the answer costs nothing (eager, CPU): on an
        accelerator, or while compiling, the mask is always built, so a forward never waits for the
        device (the attention result is the same either way)."""
        if attention_mask is None or (host_checks(attention_mask) and bool(attention_mask.all())):
            return None
        parts = [attention_mask.bool()]
        batch = attention_mask.shape[0]
        if vision is not None:
            parts.insert(0, attention_mask.new_ones(batch, vision.shape[1], dtype=torch.bool))
        if past is not None:
            parts.insert(0, attention_mask.new_ones(batch, past.length, dtype=torch.bool))
        return torch.cat(parts, dim=1)

    def _check_inputs(self, pixel_values, input_ids, attention_mask, image_mask, text_position_offset) -> None:
        """Turn the mistakes users actually make into messages that say what to fix."""
        config = self.config
        if pixel_values is None and input_ids is None:
            raise ValueError("pass pixel_values, input_ids or both")
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
            batch, channels, height, width = pixel_values.shape
            if channels != config.in_channels:
                raise ValueError(f"pixel_values has {channels} channels, the model expects {config.in_channels}")
            if height < config.patch_size or width < config.patch_size:
                raise ValueError(f"image of {height}x{width} pixels is smaller than one {config.patch_size}x{config.patch_size} patch")
            if height % config.patch_size or width % config.patch_size:
                raise ValueError(
                    f"image of {height}x{width} pixels is not a multiple of the patch size {config.patch_size}; resize or pad it"
                )
            if image_mask is not None:
                patches = (height // config.patch_size) * (width // config.patch_size)
                if image_mask.shape != (batch, patches) or image_mask.dtype != torch.bool:
                    raise ValueError(f"image_mask must be a bool tensor of shape ({batch}, {patches}), got "
                                     f"{image_mask.dtype} {tuple(image_mask.shape)}")
        elif image_mask is not None:
            raise ValueError("image_mask was given without pixel_values")
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("attention_mask was given without input_ids")
            return
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if pixel_values is not None and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: pixel_values has {pixel_values.shape[0]} images, "
                             f"input_ids has {input_ids.shape[0]} texts")
        # Value checks read the tensors back: done only where that is free (see host_checks). On a GPU
        # an out-of-range id still fails, in the embedding kernel, with a device-side assert.
        values = host_checks(input_ids)
        if values and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
            raise ValueError(f"input_ids contains ids outside the vocabulary [0, {config.vocab_size}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        end = text_position_offset + input_ids.shape[1]
        if end > config.max_text_length:
            raise ValueError(f"text of {end} tokens is longer than the position table allows "
                             f"({config.max_text_length}); truncate it")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                 f"shape {tuple(input_ids.shape)}")
            if values and pixel_values is None and input_ids.shape[1] and not bool(attention_mask.any(dim=1).all()):
                raise ValueError("a text-only input has a row whose attention_mask is all zeros (nothing to attend to)")
