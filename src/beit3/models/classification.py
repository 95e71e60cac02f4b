"""Image classification: mean of the patch tokens -> LayerNorm -> linear."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.heads import init_head
from beit3.models.outputs import ClassifierOutput


class Beit3ForImageClassification(Beit3PreTrainedModel):
    """Vision-only classifier (V experts only), as the released ImageNet models.

    The release has no final backbone LayerNorm for this task; ``fc_norm`` normalises the pooled
    patch tokens instead. Loss: cross-entropy with label smoothing for class ids, soft-target
    cross-entropy for (B, num_labels) targets (mixup / cutmix).
    """

    official_final_norm = False

    def __init__(self, config: Beit3Config, num_labels: int = 1000, label_smoothing: float = 0.1):
        super().__init__(config)
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing
        self.beit3 = Beit3Model(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, num_labels)
        init_head(self.fc_norm, std=config.initializer_range)
        init_head(self.head, scale=0.001, std=config.initializer_range)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        hidden = self.beit3(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, D)
        logits = self.head(self.fc_norm(hidden[:, 1:].mean(dim=1)))
        loss = None
        if labels is not None:
            if labels.dim() == 2:  # soft targets from mixup / cutmix
                loss = torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return ClassifierOutput(logits=logits, loss=loss)

    def head_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "label_smoothing": self.label_smoothing}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"num_labels": state["head.weight"].shape[0]} if "head.weight" in state else {}
