"""BEiT-3 as a vision backbone for dense prediction (detection, instance and semantic segmentation).

The vision path (V experts only) runs on any image size; its last feature map (stride = patch
size) becomes a multi-scale pyramid with ViTDet's *simple feature pyramid*: two transposed convs
(x4), one (x2), identity (x1) and a max-pool (x0.5), each followed by a 1x1 and a 3x3 conv. For
large images most blocks can attend inside non-overlapping windows (ViTDet), the rest globally.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel
from beit3.models.outputs import ClassifierOutput


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """One stride-P map -> maps at strides P/4, P/2, P, 2P (ViTDet), all with ``out_channels``."""

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.stages = nn.ModuleList()
        for scale in self.SCALES:
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                width = dim // 4
            elif scale == 2.0:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, width = [], dim
            else:
                layers, width = [nn.MaxPool2d(2, stride=2)], dim
            layers += [nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, feature: torch.Tensor) -> list[torch.Tensor]:
        return [stage(feature) for stage in self.stages]


def default_global_blocks(depth: int) -> set[int]:
    """ViTDet's choice: the last block of each quarter of the depth attends globally."""
    return {max(0, depth * quarter // 4 - 1) for quarter in (1, 2, 3, 4)}


def feature_map(beit3: Beit3Model, pixel_values: torch.Tensor, window_size: int,
                global_blocks: Collection[int]) -> torch.Tensor:
    """(B, C, H, W) -> the last block's patch features as a (B, D, H/P, W/P) map (V experts only).

    The CLS token is dropped before the blocks (ViTDet has none); the final norm applies when the
    backbone has one. With ``window_size`` > 0, blocks not in ``global_blocks`` attend within
    non-overlapping windows of that many patches a side.
    """
    (features,) = beit3.forward_intermediates(
        pixel_values, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True, keep_cls_token=False,
        window_size=window_size, global_blocks=global_blocks,
    )
    return features


def detection_maps(levels: list[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Pyramid levels -> torchvision's dict of maps {"0", "1", ...}, plus the extra "pool" level
    (stride 2 over the coarsest) that its RPN expects for a fifth anchor size."""
    maps = OrderedDict((str(i), level) for i, level in enumerate(levels))
    maps["pool"] = F.max_pool2d(levels[-1], 1, stride=2)
    return maps


class Beit3VisionBackbone(nn.Module):
    """Beit3Model's vision path -> OrderedDict of pyramid maps {"0": P/4, "1": P/2, "2": P, "3": 2P, "pool": 4P}.

    Follows torchvision's detection backbone contract (``out_channels``, a dict of maps), so it
    plugs into ``torchvision.models.detection.MaskRCNN``. See `feature_map` for windows.
    """

    def __init__(self, beit3: Beit3Model, out_channels: int = 256, window_size: int = 0,
                 global_blocks: tuple[int, ...] | None = None):
        super().__init__()
        self.beit3 = beit3
        self.out_channels = out_channels
        self.window_size = window_size
        self.global_blocks = default_global_blocks(beit3.config.num_layers) if global_blocks is None else set(global_blocks)
        self.pyramid = SimpleFeaturePyramid(beit3.config.hidden_size, out_channels)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return feature_map(self.beit3, pixel_values, self.window_size, self.global_blocks)

    def forward(self, pixel_values: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return detection_maps(self.pyramid(self.features(pixel_values)))


@dataclass
class DetectionOutput:
    loss: torch.Tensor | None = None
    """Sum of the RPN and RoI-head losses (training)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each loss term (training)."""
    detections: list[dict[str, torch.Tensor]] | None = None
    """Per image: ``boxes`` (K, 4) xyxy in input pixels, ``labels``, ``scores``, ``masks`` (K, 1, H, W)
    probabilities (evaluation)."""


class Beit3ForInstanceSegmentation(Beit3PreTrainedModel):
    """Mask R-CNN (torchvision's RPN, RoI heads and transform) on the BEiT-3 simple feature pyramid.

    ``num_labels`` counts object classes; label 0 is the background. The backbone is this model's
    ``beit3`` (so pretrained and official weights load as for every other task). Anchors scale with
    the pyramid (8 x stride per level, three aspect ratios). Images are given in [0, 1] and
    normalised with mean = std = 0.5 inside, resized so that their sides lie in [min_size, max_size].
    """

    official_final_norm = False

    def __init__(self, config: Beit3Config, num_labels: int = 80, out_channels: int = 256, window_size: int = 0,
                 min_size: int | None = None, max_size: int | None = None, rois_per_image: int = 512):
        super().__init__(config)
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign

        self.num_labels, self.out_channels, self.window_size = num_labels, out_channels, window_size
        self.rois_per_image = rois_per_image
        self.min_size, self.max_size = min_size or config.image_size, max_size or min_size or config.image_size
        self.beit3 = Beit3Model(config)
        self.pyramid = SimpleFeaturePyramid(config.hidden_size, out_channels)
        stride = config.patch_size
        strides = (stride / 4, stride / 2, stride, stride * 2, stride * 4)
        levels = ["0", "1", "2", "3"]
        placeholder = nn.Identity()
        placeholder.out_channels = out_channels
        # Head widths follow the pyramid width (torchvision's defaults at 256 channels: a 1024-wide box
        # MLP, four 256-channel mask convs), so small models get small heads.
        representation = 4 * out_channels
        # Build torchvision's detector once and keep its parts; the backbone is ours, registered once.
        detector = MaskRCNN(
            placeholder, num_classes=None, box_batch_size_per_image=rois_per_image,
            box_head=TwoMLPHead(out_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_labels + 1),
            mask_head=MaskRCNNHeads(out_channels, [out_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_labels + 1),
            rpn_anchor_generator=AnchorGenerator(tuple((int(8 * s),) for s in strides), ((0.5, 1.0, 2.0),) * 5),
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
            mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
            min_size=self.min_size, max_size=self.max_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        )
        self.transform, self.rpn, self.roi_heads = detector.transform, detector.rpn, detector.roi_heads

    def feature_maps(self, pixel_values: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        global_blocks = default_global_blocks(self.config.num_layers)
        return detection_maps(self.pyramid(feature_map(self.beit3, pixel_values, self.window_size, global_blocks)))

    def forward(self, pixel_values: torch.Tensor | list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None = None) -> DetectionOutput:
        """pixel_values: (B, 3, H, W) or a list of (3, H_i, W_i) in [0, 1]; targets (training):
        per image ``boxes`` (N, 4) xyxy, ``labels`` (N,) in 1..num_labels, ``masks`` (N, H, W)."""
        images = list(pixel_values)
        if self.training and targets is None:
            raise ValueError("training needs targets (boxes, labels, masks per image)")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        if batch.tensors.shape[-1] % self.config.patch_size or batch.tensors.shape[-2] % self.config.patch_size:
            raise ValueError(f"padded batch {tuple(batch.tensors.shape[-2:])} is not a multiple of the patch size")
        features = self.feature_maps(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            losses = {**proposal_losses, **head_losses}
            return DetectionOutput(loss=sum(losses.values()), losses=losses)
        return DetectionOutput(detections=self.transform.postprocess(detections, batch.image_sizes, original_sizes))

    def head_args(self) -> dict:
        return {"num_labels": self.num_labels, "out_channels": self.out_channels, "window_size": self.window_size,
                "min_size": self.min_size, "max_size": self.max_size, "rois_per_image": self.rois_per_image}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict:
        key = "roi_heads.box_predictor.cls_score.weight"
        return {"num_labels": state[key].shape[0] - 1} if key in state else {}


class Beit3ForSemanticSegmentation(Beit3PreTrainedModel):
    """Pyramid + semantic-FPN head (Kirillov et al.): every level is convolved and upsampled to
    stride P/4, the maps are summed and classified per pixel, then upsampled to the input.
    Loss: cross-entropy ignoring label 255 (ADE20K's "other")."""

    official_final_norm = False
    ignore_index = 255

    def __init__(self, config: Beit3Config, num_labels: int = 150, out_channels: int = 256, window_size: int = 0):
        super().__init__(config)
        self.num_labels, self.out_channels, self.window_size = num_labels, out_channels, window_size
        self.beit3 = Beit3Model(config)
        self.pyramid = SimpleFeaturePyramid(config.hidden_size, out_channels)
        groups = 32 if out_channels % 32 == 0 else 1
        self.level_heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                          nn.GroupNorm(groups, out_channels), nn.ReLU(inplace=True))
            for _ in SimpleFeaturePyramid.SCALES
        )
        self.classifier = nn.Conv2d(out_channels, num_labels, 1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        global_blocks = default_global_blocks(self.config.num_layers)
        levels = self.pyramid(feature_map(self.beit3, pixel_values, self.window_size, global_blocks))
        target = levels[0].shape[-2:]
        fused = sum(F.interpolate(head(level), size=target, mode="bilinear", align_corners=False)
                    if level.shape[-2:] != target else head(level)
                    for head, level in zip(self.level_heads, levels))
        logits = F.interpolate(self.classifier(fused), size=pixel_values.shape[-2:], mode="bilinear",
                               align_corners=False)  # (B, classes, H, W)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.ignore_index)
        return ClassifierOutput(logits=logits, loss=loss)

    def head_args(self) -> dict:
        return {"num_labels": self.num_labels, "out_channels": self.out_channels, "window_size": self.window_size}

    @classmethod
    def head_args_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict:
        if "classifier.weight" not in state:
            return {}
        return {"num_labels": state["classifier.weight"].shape[0], "out_channels": state["classifier.weight"].shape[1]}
