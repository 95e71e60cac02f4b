"""Semantic segmentation metrics: mean IoU and pixel accuracy from a confusion matrix."""
from __future__ import annotations

import torch


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted; pixels labelled
    ``ignore_index`` are left out. Accumulate over batches by adding the matrices."""
    valid = target != ignore_index
    target, prediction = target[valid].long(), prediction[valid].long()
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"label {int(target.max())} outside [0, {num_classes}) (and not ignore_index {ignore_index})")
    return torch.bincount(target * num_classes + prediction, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over the classes that occur (in the ground truth or the prediction), pixel accuracy,
    and mean per-class accuracy, in percent (as mmsegmentation reports ADE20K)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    per_class_total = confusion.sum(1)
    seen = per_class_total > 0
    total = confusion.sum()
    return {
        "mIoU": 100 * float((true_positive[present] / union[present]).mean()) if present.any() else 0.0,
        "pixel_accuracy": 100 * float(true_positive.sum() / total) if total > 0 else 0.0,
        "mean_accuracy": 100 * float((true_positive[seen] / per_class_total[seen]).mean()) if seen.any() else 0.0,
    }
