import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import Beit3Model
from tests.models.reference import official_names
from beit3.models.dense import (
    Beit3ForInstanceSegmentation,
    Beit3ForSemanticSegmentation,
    Beit3VisionBackbone,
    default_global_blocks,
    feature_map,
)

TINY = Beit3Config.from_preset("tiny")  # patch 8


@pytest.mark.parametrize("height, width", [(32, 32), (64, 48), (40, 88)])
def test_pyramid_shapes_at_several_sizes(height, width):
    backbone = Beit3VisionBackbone(Beit3Model(TINY), out_channels=32).eval()
    maps = backbone(torch.randn(2, 3, height, width))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    h, w = height // 8, width // 8
    expected = [(h * 4, w * 4), (h * 2, w * 2), (h, w), (h // 2, w // 2)]
    for level, size in zip(list(maps.values())[:4], expected):
        assert level.shape == (2, 32, *size)


def test_windows_that_cover_the_image_equal_global_attention():
    beit3 = Beit3Model(TINY).eval()
    images = torch.randn(1, 3, 32, 32)  # a 4x4 patch grid
    with torch.no_grad():
        global_features = feature_map(beit3, images, window_size=0, global_blocks=())
        one_window = feature_map(beit3, images, window_size=4, global_blocks=())
        small_windows = feature_map(beit3, images, window_size=2, global_blocks=())
    torch.testing.assert_close(one_window, global_features, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(small_windows, global_features, atol=1e-3)


def test_features_equal_the_backbone_patch_tokens_without_cls():
    """Without windows, the dense path is the vision-only forward minus CLS (which it never sees)."""
    beit3 = Beit3Model(TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = feature_map(beit3, images, window_size=0, global_blocks=default_global_blocks(2))
        x = beit3.embed_image(images)[:, 1:]
        for block in beit3.layers:
            x, _, _ = block(x, None, joint=False, attn_mask=None)
        x = beit3.norm["vision"](x)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), x)


def test_mask_rcnn_trains_and_predicts(tmp_path):
    model = Beit3ForInstanceSegmentation(TINY, num_labels=2, out_channels=32, min_size=64)
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}] * 2
    out = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(out.losses)
    out.loss.backward()
    assert model.beit3.layers[0].ffn["vision"].fc1.weight.grad is not None
    assert not any(".beit3." in key for key in model.state_dict())  # the backbone is registered once
    model.eval()
    with torch.no_grad():
        detections = model(images).detections
    assert set(detections[0]) == {"boxes", "labels", "scores", "masks"}
    model.save_pretrained(tmp_path / "det")
    loaded = Beit3ForInstanceSegmentation.from_pretrained(tmp_path / "det")
    assert loaded.num_labels == 2 and loaded.min_size == 64
    with pytest.raises(ValueError, match="targets"):
        model.train()(images)


def test_official_vision_weights_load_into_the_detection_backbone(tmp_path):
    """An official checkpoint file loads into the detector's backbone with no missing vision keys."""
    source = Beit3Model(TINY)
    torch.save({"model": {f"beit3.{k}": v for k, v in official_names(source).items()}}, tmp_path / "o.pth")
    model = Beit3ForInstanceSegmentation.from_pretrained(tmp_path / "o.pth", init_head=True, num_heads=4,
                                                        image_size=64, num_labels=2, out_channels=32)
    mine = model.beit3.state_dict()
    vision_keys = [k for k in source.state_dict() if ".text." not in k and not k.startswith(("text_", "norm."))]
    for key in vision_keys:
        if key != "vision_pos_embed":  # resampled from 32 px to 64 px
            torch.testing.assert_close(mine[key], source.state_dict()[key], msg=key)


def test_semantic_segmentation_forward_loss_and_save(tmp_path):
    model = Beit3ForSemanticSegmentation(TINY, num_labels=5, out_channels=32)
    images = torch.randn(2, 3, 32, 48)
    labels = torch.randint(0, 5, (2, 32, 48))
    labels[0, :4] = 255
    out = model(images, labels)
    assert out.logits.shape == (2, 5, 32, 48) and out.loss.item() > 0
    out.loss.backward()
    model.save_pretrained(tmp_path / "seg")
    loaded = Beit3ForSemanticSegmentation.from_pretrained(tmp_path / "seg")
    assert loaded.num_labels == 5 and loaded.out_channels == 32
