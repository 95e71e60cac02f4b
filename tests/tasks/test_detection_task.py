import json

import numpy as np
import pytest
from PIL import Image

from beit3.cli import main
from beit3.tasks.detection import coco_average_precision


def make_coco_folder(root, count=4, size=32):
    """``count`` images with one bright square each, and their COCO instances file."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        x, y, side = 4 + 3 * i, 6 + 2 * i, 10
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        pixels[y:y + side, x:x + side] = 255
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": side * side,
                            "bbox": [x, y, side, side],
                            "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]]})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def test_coco_ap_of_perfect_and_wrong_detections(tmp_path):
    root = make_coco_folder(tmp_path)
    truth = json.loads((root / "instances.json").read_text())["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in truth]
    assert coco_average_precision(root / "instances.json", perfect, [1, 2, 3, 4], "bbox")["box_AP"] == pytest.approx(100)
    shifted = [{**r, "bbox": [r["bbox"][0] + 15, r["bbox"][1] + 15, 10, 10]} for r in perfect]
    assert coco_average_precision(root / "instances.json", shifted, [1, 2, 3, 4], "bbox")["box_AP"] == 0
    assert coco_average_precision(root / "instances.json", [], [1], "segm") == {"mask_AP": 0.0, "mask_AP50": 0.0,
                                                                                "mask_AP75": 0.0}


def test_finetune_detection_runs_on_the_engine(tmp_path):
    root = make_coco_folder(tmp_path / "data")
    code = main([
        "finetune", "--recipe", "configs/tiny_detection.yaml", f"data.root={root}", f"train.output_dir={tmp_path / 'run'}",
        "data.batch_size=2", "schedule.epochs=1", "model.image_size=32", "task.options.num_classes=1",
        "task.options.train_images=images", "task.options.train_annotations=instances.json",
        "task.options.val_images=images", "task.options.val_annotations=instances.json",
        "task.options.out_channels=16", "task.options.rois_per_image=16",
    ])
    assert code == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "box_AP" in metrics and "mask_AP" in metrics


def test_num_classes_must_match_the_annotations(tmp_path):
    root = make_coco_folder(tmp_path / "data")
    code = main(["finetune", "--recipe", "configs/tiny_detection.yaml", f"data.root={root}",
                 f"train.output_dir={tmp_path / 'run'}", "task.options.train_images=images",
                 "task.options.train_annotations=instances.json", "task.options.val_images=images",
                 "task.options.val_annotations=instances.json"])
    assert code != 0
