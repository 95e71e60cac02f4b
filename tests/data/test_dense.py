import json

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.data.dense import CocoInstanceDataset, SemanticSegmentationDataset, unpad_targets
from beit3.data.index import EmptyDatasetError


def make_segmentation_folder(root, count=4, size=16):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        labels = np.zeros((size, size), dtype=np.uint8)
        labels[:, size // 2:] = 2  # right half class 2, left half class 0
        image = np.zeros((size, size, 3), dtype=np.uint8)
        image[:, size // 2:] = 255
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(labels).save(root / "labels" / f"{i:03d}.png")
    (root / "images" / "unlabelled.jpg").write_bytes((root / "images" / "000.jpg").read_bytes())
    return root


def test_segmentation_folder_pairs_resizes_and_reduces_zero(tmp_path):
    root = make_segmentation_folder(tmp_path)
    plain = SemanticSegmentationDataset(root / "images", root / "labels", image_size=32)
    assert len(plain) == 4  # the image without a label PNG is left out
    sample = plain[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["labels"].shape == (32, 32)
    assert sample["labels"][0, 0] == 0 and sample["labels"][0, -1] == 2
    assert sample["pixel_values"][0, 0, 0] == pytest.approx(-1.0) and sample["pixel_values"][0, 0, -1] == pytest.approx(1.0)
    ade = SemanticSegmentationDataset(root / "images", root / "labels", image_size=32, reduce_zero_label=True)
    assert ade[0]["labels"][0, 0] == 255 and ade[0]["labels"][0, -1] == 1


def test_segmentation_training_flip_moves_image_and_labels_together(tmp_path):
    root = make_segmentation_folder(tmp_path)
    data = SemanticSegmentationDataset(root / "images", root / "labels", image_size=16, train=True, seed=1)
    for index in range(4):
        sample = data[index]
        bright = sample["pixel_values"][0] > 0
        assert torch.equal(bright, sample["labels"] == 2)


def test_segmentation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SemanticSegmentationDataset(tmp_path / "nowhere", tmp_path, image_size=16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(EmptyDatasetError):
        SemanticSegmentationDataset(tmp_path / "a", tmp_path / "b", image_size=16)


def test_coco_instances_padded_targets(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "one.png")
    coco = {
        "images": [{"id": 7, "file_name": "one.png", "width": 40, "height": 20}],
        "categories": [{"id": 5, "name": "square"}, {"id": 2, "name": "circle"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [4, 2, 10, 8], "iscrowd": 0,
             "segmentation": [[4, 2, 14, 2, 14, 10, 4, 10]]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [20, 0, 4, 4], "iscrowd": 1, "segmentation": []},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    data = CocoInstanceDataset(tmp_path, tmp_path / "instances.json", image_size=20, max_objects=3)
    assert data.categories == ["circle", "square"]  # ordered by category id: labels 1, 2
    sample = data[0]
    assert sample["num_objects"] == 1 and sample["image_id"] == 7  # the crowd box is left out
    torch.testing.assert_close(sample["boxes"][0], torch.tensor([2.0, 2.0, 7.0, 10.0]))  # x scaled by 0.5
    assert sample["classes"].tolist() == [2, 0, 0]
    assert sample["masks"][0].sum() > 0 and sample["masks"][1:].sum() == 0
    batch = {k: v[None] for k, v in sample.items()}
    (target,) = unpad_targets(batch)
    assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [2]


def test_coco_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json:1"):
        CocoInstanceDataset(tmp_path, tmp_path / "bad.json", image_size=16)
    (tmp_path / "partial.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        CocoInstanceDataset(tmp_path, tmp_path / "partial.json", image_size=16)
