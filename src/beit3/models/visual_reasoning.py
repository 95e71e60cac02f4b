"""NLVR2: is a statement true of a pair of images?"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.heads import TwoLayerMLP, init_head
from beit3.models.outputs import ClassifierOutput


class Beit3ForVisualReasoning(Beit3PreTrainedModel):
    """Image pair + statement -> logits (B, 2); label 1 means "true".

    Each image is encoded jointly with the statement; the image CLS and the text BOS of both
    passes are concatenated as [vision_a, text_a, vision_b, text_b] and classified.

    head_init_scale: factor on the head's two linear layers at initialisation. The release's 0.001
    suits its pretrained 768-wide backbones; a small model from scratch needs 1.0: the backbone's
    gradient goes through both shrunken layers, is a millionth of its size, falls under AdamW's
    epsilon and the loss stays at ln 2 (the tiny recipe, 1200 steps).
    """

    official_final_norm = True

    def __init__(self, config: Beit3Config, head_init_scale: float = 0.001):
        super().__init__(config)
        dim = config.hidden_size
        self.beit3 = Beit3Model(config)
        self.head = TwoLayerMLP(4 * dim, 2 * dim, 2, config.layer_norm_eps)
        init_head(self.head.norm1, self.head.norm2, std=config.initializer_range)
        init_head(self.head.dense1, self.head.dense2, scale=head_init_scale, std=config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"pixel_values must hold an image pair, shape (B, 2, C, H, W); got {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"batch sizes differ: {batch} image pairs, {input_ids.shape[0]} statements")
        images = pixel_values.transpose(0, 1).flatten(0, 1)  # (2B, C, H, W): all left, then all right
        ids = input_ids.repeat(2, 1)
        mask = attention_mask.repeat(2, 1) if attention_mask is not None else None
        out = self.beit3(images, ids, mask)
        hidden = out.last_hidden_state
        pooled = torch.cat([hidden[:, 0], hidden[:, out.vision_len]], dim=-1)  # (2B, 2D)
        logits = self.head(torch.cat([pooled[:batch], pooled[batch:]], dim=-1))  # (B, 2)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)
