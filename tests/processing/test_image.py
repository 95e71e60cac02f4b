"""Beit3ImageProcessor and load_image: official eval pipelines, every input kind, bad files, RandAugment ops."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from beit3.processing import Beit3ImageProcessor, RandomAugment, load_image

BICUBIC = T.InterpolationMode.BICUBIC
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_image(width: int = 48, height: int = 36, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2:, 2] = 255
    return Image.fromarray(array)


# ---------------------------------------------------------------------- hand computations
def test_constant_colour_normalised_by_hand():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    vl = Beit3ImageProcessor(16, "vl")(img)["pixel_values"]
    assert vl.shape == (1, 3, 16, 16)
    # mean = std = 0.5: (x / 255 - 0.5) / 0.5
    expected_vl = torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5])
    torch.testing.assert_close(vl[0], expected_vl.view(3, 1, 1).expand(3, 16, 16))
    imagenet = Beit3ImageProcessor(16, "imagenet")(img)["pixel_values"]
    expected_in = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(imagenet[0], expected_in.view(3, 1, 1).expand(3, 16, 16))


def test_vl_squashes_without_crop():
    # 32x8 -> 8x8: aspect ratio is not kept, both halves survive (a crop would lose one).
    out = Beit3ImageProcessor(8, "vl")(_halves(32, 8))["pixel_values"][0]
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out[:, :, 0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1).expand(3, 8))
    torch.testing.assert_close(out[:, :, 7], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1).expand(3, 8))


def test_imagenet_resizes_short_side_and_centre_crops():
    # 8x4 with S=4, crop_pct=1: the short side is already 4, the crop keeps columns 2..5.
    out = Beit3ImageProcessor(4, "imagenet")(_halves(8, 4))["pixel_values"][0]
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    blue = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, (1 - 0.406) / 0.225])
    for col, colour in ((0, red), (1, red), (2, blue), (3, blue)):
        torch.testing.assert_close(out[:, :, col], colour.view(3, 1).expand(3, 4))


# ---------------------------------------------------------------------- against torchvision
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_eval_pipelines_match_hand_built_torchvision(crop_pct):
    img = _random_image()
    vl = T.Compose([T.Resize((24, 24), interpolation=BICUBIC), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    torch.testing.assert_close(Beit3ImageProcessor(24, "vl").preprocess(img), vl(img), rtol=0, atol=0)
    imagenet = T.Compose([T.Resize(int(24 / crop_pct), interpolation=BICUBIC), T.CenterCrop(24),
                          T.ToTensor(), T.Normalize(IN_MEAN, IN_STD)])
    ours = Beit3ImageProcessor(24, "imagenet", crop_pct=crop_pct).preprocess(img)
    torch.testing.assert_close(ours, imagenet(img), rtol=0, atol=0)


def test_blip_ops_by_hand():
    aug = RandomAugment.blip()
    grey = Image.new("RGB", (20, 10), (100, 100, 100))
    # enhance factor at magnitude 7 = 0.7 * 1.8 + 0.1 = 1.36 -> 136
    assert aug.ops["Brightness"](grey, 0.7, aug).getpixel((5, 5)) == (136, 136, 136)
    ramp = Image.fromarray(np.tile(np.linspace(50, 100, 20).astype(np.uint8), (10, 1))).convert("RGB")
    stretched = np.asarray(aug.ops["AutoContrast"](ramp, 0.7, aug))
    # values 50..100 are stretched to the full range (PIL's lookup table truncates 255 to 254)
    assert stretched.min() == 0 and stretched.max() >= 254
    assert (np.diff(stretched[0, :, 0].astype(int)) >= 0).all()
    # a 7-pixel translation fills the uncovered columns with grey 128
    white = Image.new("RGB", (20, 10), (255, 255, 255))
    torch.manual_seed(0)
    shifted = np.asarray(aug.ops["TranslateX"](white, 0.7, aug))
    grey_columns = np.where((shifted == 128).all(axis=(0, 2)))[0]
    assert len(grey_columns) == 7 and grey_columns.tolist() in ([*range(7)], [*range(13, 20)])


def test_timm_ops_keep_size_at_every_level():
    aug = RandomAugment.timm_increasing(IN_MEAN)
    assert aug.fill == (124, 116, 104)
    img = _random_image(20, 12)
    for name, op in aug.ops.items():
        for level in (0.0, 0.5, 1.0):
            out = op(img, level, aug)
            assert out.size == img.size and out.mode == "RGB", name
    assert np.asarray(aug.ops["PosterizeIncreasing"](img, 1.0, aug)).max() == 0


# ---------------------------------------------------------------------- input kinds
def test_every_input_kind_gives_the_same_pixels(tmp_path):
    img = _random_image(30, 20)
    array = np.array(img)
    path = tmp_path / "pic.png"
    img.save(path)
    proc = Beit3ImageProcessor(16, "vl")
    expected = proc.preprocess(img)
    inputs = [array, array.astype(np.float32) / 255.0, torch.from_numpy(array).permute(2, 0, 1),
              torch.from_numpy(array).permute(2, 0, 1).float() / 255.0, str(path), path, path.read_bytes()]
    for item in inputs:
        torch.testing.assert_close(proc.preprocess(item), expected, rtol=0, atol=0)
    batch = proc([img, path])["pixel_values"]
    assert batch.shape == (2, 3, 16, 16)
    assert proc(torch.from_numpy(np.stack([array, array])).permute(0, 3, 1, 2))["pixel_values"].shape == (2, 3, 16, 16)


def test_mode_conversions():
    grey = load_image(np.full((4, 5), 70, dtype=np.uint8))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (70, 70, 70)
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert load_image(palette).getpixel((1, 1)) == (10, 20, 30)
    cmyk = load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))
    assert cmyk.getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert load_image(sixteen).getpixel((0, 0)) == (255, 255, 255)


def test_rgba_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)       # fully transparent -> white, not black
    rgba[1, 0] = (255, 0, 0, 128)   # half red over white -> (255, 127, 127)
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert out.getpixel((0, 1)) == (255, 127, 127)
    la = Image.fromarray(np.zeros((2, 2, 2), dtype=np.uint8), mode="LA")
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)
    assert load_image(path.read_bytes()).size == (20, 40)


def test_tiny_image_is_resized_up():
    out = Beit3ImageProcessor(16, "imagenet")(Image.new("RGB", (1, 1), (0, 255, 0)))["pixel_values"]
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out[0, 1], torch.full((16, 16), (1 - 0.456) / 0.224))


# ---------------------------------------------------------------------- bad inputs
def test_unreadable_files_give_clear_errors(tmp_path):
    good = io.BytesIO()
    _random_image(64, 64).save(good, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    with pytest.raises(ValueError, match="truncated.jpg.*truncated"):
        load_image(truncated)
    with pytest.raises(ValueError, match="empty.jpg.*0 bytes"):
        load_image(empty)
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        load_image(text)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="<bytes>"):
        load_image(b"\x00\x01garbage")


def test_bad_arrays_and_types():
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 3.0))
    with pytest.raises(ValueError, match="int64"):
        load_image(np.zeros((4, 4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="no pixels"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        load_image(42)
    with pytest.raises(ValueError, match="no images"):
        Beit3ImageProcessor(16)([])


# ---------------------------------------------------------------------- config
def test_defaults_save_load_and_bad_settings(tmp_path):
    assert Beit3ImageProcessor(224, "imagenet").mean == IN_MEAN and Beit3ImageProcessor(224, "imagenet").std == IN_STD
    assert Beit3ImageProcessor(480, "vl").mean == (0.5, 0.5, 0.5)
    processor = Beit3ImageProcessor(384, "imagenet", crop_pct=0.875, mean=(0.1, 0.2, 0.3))
    processor.save_pretrained(tmp_path)
    loaded = Beit3ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert set(loaded.to_dict()) == {"image_processor_class", "image_size", "mode", "crop_pct", "mean", "std"}
    with pytest.raises(ValueError, match="mode"):
        Beit3ImageProcessor(224, "clip")
    with pytest.raises(ValueError, match="unknown image processor settings"):
        Beit3ImageProcessor.from_dict({"image_size": 224, "resample": "nearest"})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Beit3ImageProcessor.from_pretrained(tmp_path / "nothing")


def test_processor_is_deterministic_and_takes_no_training_settings():
    """What a model folder saves must give the same pixels on every call, whatever the seed."""
    processor = Beit3ImageProcessor(24, "imagenet")
    torch.manual_seed(0)
    first = processor.preprocess(_random_image())
    torch.manual_seed(1)
    torch.testing.assert_close(processor.preprocess(_random_image()), first, rtol=0, atol=0)
    with pytest.raises(TypeError):
        Beit3ImageProcessor(24, "vl", True)  # the old positional ``train``
    for setting in ("train", "randaug", "crop_scale", "random_erasing", "horizontal_flip"):
        with pytest.raises(TypeError):
            Beit3ImageProcessor(24, "vl", **{setting: None})
    assert not hasattr(Beit3ImageProcessor, "for_task")


def test_old_config_with_training_settings_loads_as_the_eval_pipeline(tmp_path):
    """preprocessor_config.json files written before the split hold training settings: dropped."""
    old = {"image_processor_class": "Beit3ImageProcessor", "image_size": 24, "mode": "imagenet", "train": True,
           "crop_pct": 0.875, "randaug": True, "crop_scale": [0.08, 1.0], "random_erasing": 0.25,
           "mean": list(IN_MEAN), "std": list(IN_STD), "horizontal_flip": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old, indent=2) + "\n")
    loaded = Beit3ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == Beit3ImageProcessor(24, "imagenet", crop_pct=0.875).to_dict()
    img = _random_image()
    torch.testing.assert_close(loaded.preprocess(img),
                               Beit3ImageProcessor(24, "imagenet", crop_pct=0.875).preprocess(img), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown image processor settings \['resample'\]"):
        Beit3ImageProcessor.from_dict({**old, "resample": "nearest"})
