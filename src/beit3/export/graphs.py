"""The graphs an export holds: small wrapper modules around the task models, each a pure function
from tensors to tensors, with the example inputs and dynamic dimensions to trace it with.

Every wrapper returns what the runtime needs and nothing a Python caller would have computed
from host values: the captioning decoder step works out its text position and its attention
rows from the shape of the key/value cache it is given, so one graph serves every step.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from beit3.layers import KVCache, caption_attention_mask
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3PreTrainedModel,
)

EXPORT_BATCH = 2
"""The batch size graphs are traced at (any batch runs: the batch dimension is dynamic)."""


@dataclasses.dataclass
class GraphSpec:
    """One graph: its module, example inputs, and which input dimensions are dynamic."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: dimension name}
    description: str
    varargs_from: int | None = None  # inputs from this one on are the module's ``*args``

    def args(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.inputs.values())


def _num_image_tokens(model: Beit3PreTrainedModel) -> int:
    config = model.config
    return (config.image_size // config.patch_size) ** 2 + 1


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> image_embeds (B, D), unit vectors (retrieval)."""

    def __init__(self, model: Beit3ForImageTextRetrieval):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """input_ids, attention_mask (B, T) -> text_embeds (B, D), unit vectors (retrieval)."""

    def __init__(self, model: Beit3ForImageTextRetrieval):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class ImageLogits(nn.Module):
    """pixel_values -> the model's ``logits`` (image classification)."""

    def __init__(self, model: Beit3PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


class ImageTextLogits(ImageLogits):
    """pixel_values, input_ids, attention_mask -> the model's ``logits`` (VQA, NLVR2)."""

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,  # type: ignore[override]
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, input_ids, attention_mask).logits


class CaptionEncoder(nn.Module):
    """The first decoding step: image + the prompt (BOS, [MASK]) -> log-probabilities of the first
    word at the [MASK] slot (B, V) and every layer's keys and values (B, H, I + 2, Dh)."""

    def __init__(self, model: Beit3ForCaptioning):
        super().__init__()
        self.model = model
        self.num_image = _num_image_tokens(model)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = caption_attention_mask(self.num_image, input_ids.shape[1], device=input_ids.device)
        out = self.model.beit3(pixel_values, input_ids, attn_mask=mask, use_cache=True)
        log_probs = F.log_softmax(self.model.mlm_head(out.last_hidden_state[:, -1]).float(), dim=-1)
        return (log_probs, *[t for kv in out.past_key_values.layers for t in kv])


class CaptionDecoder(nn.Module):
    """One decoding step: (newest word, [MASK]) ids (B, 2) and the cache of the image and the words
    before (B, H, P, Dh) per layer -> log-probabilities at the [MASK] slot (B, V) and the cache
    extended by both tokens (B, H, P + 2, Dh).

    P = image tokens + BOS + earlier words, so the step's text positions start at P - image tokens;
    the word attends to everything but the [MASK] slot, the [MASK] slot to everything (the last
    two rows of the captioning mask).
    """

    def __init__(self, model: Beit3ForCaptioning):
        super().__init__()
        self.model = model
        self.num_image = _num_image_tokens(model)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        past_length = past[0].shape[2]
        keys = torch.arange(past_length + 2, device=input_ids.device)
        queries = past_length + torch.arange(2, device=input_ids.device)
        rows = keys[None, :] <= queries[:, None]  # (2, P + 2) bool
        out = self.model.beit3(input_ids=input_ids, attn_mask=rows, past_key_values=KVCache(layers, joint=True),
                               use_cache=True, text_position_offset=past_length - self.num_image)
        log_probs = F.log_softmax(self.model.mlm_head(out.last_hidden_state[:, -1]).float(), dim=-1)
        return (log_probs, *[t for kv in out.past_key_values.layers for t in kv])


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """``{prefix}_key_0, {prefix}_value_0, ...``: the per-layer cache tensors in graph order."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def graph_specs(model: Beit3PreTrainedModel, text_length: int = 8) -> list[GraphSpec]:
    """The graphs of ``model``'s task, with example inputs at batch :data:`EXPORT_BATCH`."""
    config = model.config
    batch, size = EXPORT_BATCH, config.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, config.in_channels, size, size, generator=generator)
    ids = torch.randint(3, config.vocab_size, (batch, text_length), generator=generator)
    mask = torch.ones(batch, text_length, dtype=torch.long)
    mask[1, text_length // 2:] = 0  # a padded row: the mask must stay an input, never a constant
    text_dims = {0: "batch", 1: "text"}
    if isinstance(model, Beit3ForImageTextRetrieval):
        return [
            GraphSpec("image_encoder", ImageEncoder(model), {"pixel_values": pixels}, ["image_embeds"],
                      {"pixel_values": {0: "batch"}}, "retrieval image embeddings (encode_image)"),
            GraphSpec("text_encoder", TextEncoder(model), {"input_ids": ids, "attention_mask": mask},
                      ["text_embeds"], {"input_ids": text_dims, "attention_mask": text_dims},
                      "retrieval text embeddings (encode_text)"),
        ]
    if isinstance(model, Beit3ForVisualQuestionAnswering):
        return [GraphSpec("vqa", ImageTextLogits(model), {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask},
                          ["logits"], {"pixel_values": {0: "batch"}, "input_ids": text_dims,
                                       "attention_mask": text_dims}, "answer logits (B, num_labels)")]
    if isinstance(model, Beit3ForImageClassification):
        return [GraphSpec("classification", ImageLogits(model), {"pixel_values": pixels}, ["logits"],
                          {"pixel_values": {0: "batch"}}, "class logits (B, num_labels)")]
    if isinstance(model, Beit3ForVisualReasoning):
        pairs = torch.randn(batch, 2, config.in_channels, size, size, generator=generator)
        return [GraphSpec("nlvr2", ImageTextLogits(model), {"pixel_values": pairs, "input_ids": ids, "attention_mask": mask},
                          ["logits"], {"pixel_values": {0: "batch"}, "input_ids": text_dims,
                                       "attention_mask": text_dims}, "false/true logits (B, 2) of image pairs")]
    if isinstance(model, Beit3ForCaptioning):
        mask_id = model.mask_token_id if model.mask_token_id is not None else config.vocab_size - 1
        prompt = torch.tensor([[model.bos_token_id, mask_id]]).expand(batch, 2).contiguous()
        encoder = CaptionEncoder(model)
        with torch.no_grad():
            first = encoder(pixels, prompt)
        # A cache as step 3 sees it: image, BOS and one word.
        past = [t[:, :, : encoder.num_image + 2].contiguous() for t in first[1:]]
        step = torch.stack([torch.randint(3, config.vocab_size, (batch,), generator=generator),
                            torch.full((batch,), mask_id)], dim=1)
        layers = config.num_layers
        past_names = cache_names("past", layers)
        cache_dims = {name: {0: "batch", 2: "past"} for name in past_names}
        return [
            GraphSpec("caption_encoder", encoder, {"pixel_values": pixels, "input_ids": prompt},
                      ["log_probs", *cache_names("present", layers)], {"pixel_values": {0: "batch"},
                                                                        "input_ids": {0: "batch"}},
                      "first step: image + (BOS, [MASK]) -> log-probs of word 1 and the key/value cache"),
            GraphSpec("caption_decoder", CaptionDecoder(model), {"input_ids": step, **dict(zip(past_names, past))},
                      ["log_probs", *cache_names("present", layers)], {"input_ids": {0: "batch"}, **cache_dims},
                      "one step: (word, [MASK]) + cache -> log-probs of the next word and the cache + 2 tokens",
                      varargs_from=1),
        ]
    raise ValueError(f"no export for {type(model).__name__}: exportable are retrieval, VQA, classification, "
                     "NLVR2 and captioning models")


def dynamic_shapes(spec: GraphSpec, model: Beit3PreTrainedModel) -> tuple:
    """``torch.export`` dimensions for the spec's dynamic axes (shared by name across inputs), in
    the structure of the module's arguments (``*args`` as one tuple)."""
    config = model.config
    num_image = _num_image_tokens(model)
    limits = {"batch": (1, 4096), "text": (1, config.max_text_length),
              "past": (num_image + 1, num_image + config.max_text_length - 2)}
    dims = {name: torch.export.Dim(name, min=low, max=high) for name, (low, high) in limits.items()}
    shapes = [{axis: dims[dim] for axis, dim in spec.dynamic.get(name, {}).items()} or None for name in spec.inputs]
    if spec.varargs_from is not None:
        shapes = [*shapes[: spec.varargs_from], tuple(shapes[spec.varargs_from:])]
    return tuple(shapes)
