"""Image-text retrieval with BEiT-3 as a dual encoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.heads import init_head
from beit3.models.outputs import RetrievalOutput


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each side is a pair)."""
    logits = logit_scale.exp() * image_embeds.float() @ text_embeds.float().t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class Beit3ForImageTextRetrieval(Beit3PreTrainedModel):
    """Two unimodal passes: image -> V experts -> CLS; text -> L experts -> BOS; each projected
    (no bias) and L2-normalised. ``forward`` returns the in-batch contrastive loss; training over
    several processes gathers features across ranks (the training engine's job)."""

    official_final_norm = True

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        dim = config.hidden_size
        self.beit3 = Beit3Model(config)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_head(self.vision_head, self.language_head, std=config.initializer_range)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.beit3(pixel_values=pixel_values).last_hidden_state[:, 0]
        return F.normalize(self.vision_head(cls), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        bos = self.beit3(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return F.normalize(self.language_head(bos), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
    ) -> RetrievalOutput:
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: {pixel_values.shape[0]} images, {input_ids.shape[0]} texts")
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.exp()
        logits = scale * image_embeds @ text_embeds.t()
        loss = contrastive_loss(image_embeds, text_embeds, self.logit_scale) if return_loss else None
        return RetrievalOutput(image_embeds=image_embeds, text_embeds=text_embeds, logits_per_image=logits,
                               logits_per_text=logits.t(), logit_scale=scale, loss=loss)
