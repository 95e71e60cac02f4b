"""Visual question answering: classify the pooled joint representation over an answer vocabulary."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.heads import Pooler, init_head
from beit3.models.outputs import ClassifierOutput


class Beit3ForVisualQuestionAnswering(Beit3PreTrainedModel):
    """Image + question -> scores over ``num_labels`` answers (3129 for VQAv2).

    Pools token 0, the image CLS (not the question's BOS), as the release does; no final
    backbone LayerNorm. Loss: binary cross-entropy against the soft scores (0/0.3/0.6/0.9/1),
    summed over answers and averaged over the batch (the release's mean x num_labels).
    """

    official_final_norm = False

    def __init__(self, config: Beit3Config, num_labels: int = 3129):
        super().__init__(config)
        self.num_labels = num_labels
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.beit3 = Beit3Model(config)
        self.pooler = Pooler(dim, eps)
        self.head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim, eps=eps), nn.GELU(),
                                  nn.Linear(2 * dim, num_labels))
        init_head(self.pooler, self.head, std=config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        hidden = self.beit3(pixel_values, input_ids, attention_mask).last_hidden_state
        logits = self.head(self.pooler(hidden[:, 0]))
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum") / labels.shape[0]
        return ClassifierOutput(logits=logits, loss=loss)

    def head_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"num_labels": state["head.3.weight"].shape[0]} if "head.3.weight" in state else {}
