import pytest
import torch

from beit3.tasks.dense_metrics import confusion_matrix, segmentation_scores


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    confusion = confusion_matrix(prediction, target, num_classes=4)
    assert confusion.sum() == 6  # the two ignored pixels are left out
    scores = segmentation_scores(confusion)
    # class 0: TP 1, FN 1, FP 1 -> IoU 1/3; class 1: TP 2, FN 0, FP 1 -> 2/3;
    # class 2: TP 1, FN 1, FP 0 -> 1/2; class 3 never occurs and is not averaged
    assert scores["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["mean_accuracy"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)


def test_confusion_accumulates_and_rejects_bad_labels():
    a = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2)
    assert segmentation_scores(a + b)["pixel_accuracy"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="label 7"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 2)
