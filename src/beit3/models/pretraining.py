"""Masked data modeling: one objective over images, texts and image-text pairs (BEiT-3, section 2.3).

Each stream runs through the backbone on its own (a text-only batch uses the language experts in
every layer, an image batch the vision experts, a pair batch the vision-language experts in the
top layers), and only the masked positions are projected by the heads:

* ``mlm_head``: final LayerNorm output -> Linear(D, vocab_size), shared by the text-only and pair
  streams (untied from the input embedding, as the release's parameter counts imply);
* ``mim_head``: Linear(D, visual_vocab_size) over masked patches, predicting the visual tokenizer's
  code of each patch (shared by the image stream and, optionally, the pair images).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model, host_checks
from beit3.models.base import INIT_STD, Beit3PreTrainedModel
from beit3.models.heads import init_head

IGNORE_INDEX = -100


@dataclasses.dataclass
class StreamResult:
    """Loss and accuracy of one stream over its predicted positions."""

    loss: torch.Tensor
    """Mean cross-entropy over the predicted positions of the batch (a scalar)."""
    accuracy: torch.Tensor
    """Top-1 accuracy over the same positions (a scalar, no gradient)."""
    scores: torch.Tensor
    """The head's scores: (num_targets, vocabulary) at the predicted positions, or, with ``picked``,
    (..., vocabulary) at every position (the form a traced model computes, see `_stream_result`)."""
    picked: torch.Tensor | None = None
    """(...) bool, the predicted positions among ``scores``' rows; None when ``scores`` holds only them."""

    @property
    def num_targets(self) -> int:
        """How many positions were predicted."""
        return int(self.scores.shape[0]) if self.picked is None else int(self.picked.sum())

    @property
    def logits(self) -> torch.Tensor:
        """(num_targets, vocabulary): scores at the predicted positions only."""
        return self.scores if self.picked is None else self.scores[self.picked]


@dataclasses.dataclass
class PreTrainingOutput:
    loss: torch.Tensor
    """Sum of the stream losses present (each weighted 1; the task may re-weight)."""
    text_mlm: StreamResult | None = None
    """Masked language modeling on text-only input (15% masked)."""
    pair_mlm: StreamResult | None = None
    """Masked language modeling on the text of image-text pairs (50% masked)."""
    image_mim: StreamResult | None = None
    """Masked image modeling on images (40% of patches, block-wise)."""
    pair_mim: StreamResult | None = None
    """Masked image modeling on the images of pairs (when the pair images are masked)."""

    def streams(self) -> dict[str, StreamResult]:
        """The streams present, by name (for logging)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "loss" and getattr(self, f.name) is not None}


def _stream_result(head: nn.Module, hidden: torch.Tensor, picked: torch.Tensor, targets: torch.Tensor,
                   dense: bool) -> StreamResult:
    """Cross-entropy and accuracy of ``head`` at the ``picked`` positions of ``hidden`` (..., D).

    In eager mode on CPU (``dense`` False) the head runs on the picked rows only: the MLM head over
    a 64k vocabulary costs about half a base block per token, and 15% of text tokens are picked. The
    number of picked rows depends on the data: on an accelerator reading it back stalls the device,
    and ``torch.compile`` cannot trace it without a graph break, so there (``dense`` True) the head
    scores every position and the picked ones are averaged: the same loss (up to float summation
    order), shapes fixed by the inputs'. ``BEIT3_CHECK_INPUTS=1`` picks the row path everywhere.
    """
    if not dense:
        logits = head(hidden[picked])
        chosen = targets[picked]
        loss = F.cross_entropy(logits.float(), chosen)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == chosen).float().mean()
        return StreamResult(loss=loss, accuracy=accuracy, scores=logits)
    logits = head(hidden)  # (..., V)
    targets = torch.where(picked, targets, torch.zeros_like(targets))  # the rest (-100) is never read
    per_token = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    count = picked.sum().clamp(min=1)
    loss = torch.where(picked.flatten(), per_token, torch.zeros_like(per_token)).sum() / count
    with torch.no_grad():
        accuracy = ((logits.argmax(-1) == targets) & picked).sum() / count
    return StreamResult(loss=loss, accuracy=accuracy, scores=logits, picked=picked)


class Beit3ForPreTraining(Beit3PreTrainedModel):
    """BEiT-3 with the masked-data-modeling heads; the backbone is ``self.beit3``.

    Its saved weights load into every task model with ``Cls.from_pretrained(dir, init_head=True)``
    (the heads are dropped, the backbone and its final LayerNorm kept where the task uses one).
    """

    official_final_norm = True
    vocab_heads = ("mlm_head",)  # the mim_head's rows are visual tokens: a new text vocabulary leaves it alone

    def __init__(self, config: Beit3Config, visual_vocab_size: int = 8192):
        super().__init__(config)
        if not config.final_norm:
            raise ValueError("Beit3ForPreTraining needs final_norm=True: the heads read the final LayerNorm's output")
        if visual_vocab_size < 2:
            raise ValueError(f"visual_vocab_size must be >= 2, got {visual_vocab_size}")
        self.visual_vocab_size = visual_vocab_size
        self.beit3 = Beit3Model(config)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.mim_head = nn.Linear(config.hidden_size, visual_vocab_size)
        # BEiT's 0.02 whatever the width: a narrow model's logits then start nearer uniform (loss ~ ln V)
        init_head(self.mlm_head, self.mim_head, std=INIT_STD)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        *,
        image_pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        pair_pixel_values: torch.Tensor | None = None,
        pair_input_ids: torch.Tensor | None = None,
        pair_attention_mask: torch.Tensor | None = None,
        pair_labels: torch.Tensor | None = None,
        pair_image_mask: torch.Tensor | None = None,
        pair_image_labels: torch.Tensor | None = None,
    ) -> PreTrainingOutput:
        """Run the streams that are given; at least one.

        image_*: pixels (B, C, H, W), the patches to mask (B, N) bool and every patch's visual
            token (B, N) long; the loss is taken at the masked patches.
        text_*: corrupted ids (B, T), padding mask (B, T), and labels (B, T) holding the original
            id at the corrupted positions and -100 elsewhere (:func:`beit3.pretraining.mask_text_tokens`).
        pair_*: the same for image-text pairs; ``pair_image_mask`` / ``pair_image_labels``
            (optional) also mask and predict patches of the pair images.
        """
        results: dict[str, StreamResult] = {}
        if image_pixel_values is not None:
            if image_mask is None or image_labels is None:
                raise ValueError("the image stream needs image_mask and image_labels")
            out = self.beit3(image_pixel_values, image_mask=image_mask)
            results["image_mim"] = self._mim(out.last_hidden_state, image_mask, image_labels)
        if text_input_ids is not None:
            if text_labels is None:
                raise ValueError("the text stream needs text_labels")
            out = self.beit3(input_ids=text_input_ids, attention_mask=text_attention_mask)
            results["text_mlm"] = self._mlm(out.last_hidden_state, text_labels)
        if pair_pixel_values is not None:
            if pair_input_ids is None or pair_labels is None:
                raise ValueError("the pair stream needs pair_input_ids and pair_labels")
            if (pair_image_mask is None) != (pair_image_labels is None):
                raise ValueError("pair_image_mask and pair_image_labels go together")
            out = self.beit3(pair_pixel_values, pair_input_ids, pair_attention_mask, image_mask=pair_image_mask)
            hidden = out.last_hidden_state
            results["pair_mlm"] = self._mlm(hidden[:, out.vision_len:], pair_labels)
            if pair_image_mask is not None:
                results["pair_mim"] = self._mim(hidden[:, : out.vision_len], pair_image_mask, pair_image_labels)
        if not results:
            raise ValueError("pass at least one stream: image_pixel_values, text_input_ids or pair_pixel_values")
        loss = torch.stack([r.loss for r in results.values()]).sum()
        return PreTrainingOutput(loss=loss, **results)

    def _mlm(self, text_hidden: torch.Tensor, labels: torch.Tensor) -> StreamResult:
        picked = labels != IGNORE_INDEX  # (B, T)
        rows = host_checks(picked)  # eager CPU: reading the mask back is free; elsewhere it would sync
        if rows and not bool(picked.any()):
            raise ValueError("no text position is masked (labels are all -100)")
        return _stream_result(self.mlm_head, text_hidden, picked, labels, dense=not rows)

    def _mim(self, vision_hidden: torch.Tensor, image_mask: torch.Tensor, labels: torch.Tensor) -> StreamResult:
        patches = vision_hidden[:, 1:]  # drop the image CLS: (B, N, D)
        if labels.shape != image_mask.shape:
            raise ValueError(f"image labels {tuple(labels.shape)} and mask {tuple(image_mask.shape)} differ in shape")
        rows = host_checks(image_mask)
        if rows and not bool(image_mask.any()):
            raise ValueError("no patch is masked")
        return _stream_result(self.mim_head, patches, image_mask, labels, dense=not rows)

    # ------------------------------------------------------------------------------------------
    def head_args(self) -> dict[str, Any]:
        return {"visual_vocab_size": self.visual_vocab_size}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        weight = state.get("mim_head.weight")
        return {} if weight is None else {"visual_vocab_size": int(weight.shape[0])}
