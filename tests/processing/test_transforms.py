"""beit3.data.transforms: the training image augmentation and caption masking moved out of the processor.

Kept next to the processor tests because the reference here is the processor's old training
branch and the masking tests use this folder's trained tokenizer.
"""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from beit3.data.transforms import (
    DEFAULT_CAPTIONING_MASK_PROB,
    TrainImageTransform,
    mask_caption_tokens,
    train_image_transform,
)
from beit3.processing import Beit3ImageProcessor, RandomAugment

BICUBIC = T.InterpolationMode.BICUBIC
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_image(width: int = 48, height: int = 36, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _pre_split_training_pipeline(size, mode, randaug=True, crop_scale=None, random_erasing=None,
                                 horizontal_flip=True):
    """``Beit3ImageProcessor(size, mode, train=True, ...)`` as it was before the split, written out."""
    vl = mode == "vl"
    crop_scale = crop_scale or ((0.5, 1.0) if vl else (0.08, 1.0))
    random_erasing = (0.0 if vl else 0.25) if random_erasing is None else random_erasing
    mean, std = ((0.5,) * 3, (0.5,) * 3) if vl else (IN_MEAN, IN_STD)
    steps = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=BICUBIC)]
    steps += [T.RandomHorizontalFlip()] if horizontal_flip else []
    if randaug:
        steps.append(RandomAugment.blip() if vl else RandomAugment.timm_increasing(mean))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random"))
    return T.Compose(steps)


# ---------------------------------------------------------------------- images
SETTINGS = [
    ("vl", {}),
    ("imagenet", {}),
    ("vl", {"randaug": False}),
    ("imagenet", {"randaug": False}),
    ("vl", {"crop_scale": (0.2, 0.9), "random_erasing": 0.5}),
    ("imagenet", {"horizontal_flip": False, "random_erasing": 0.0}),
    ("vl", {"horizontal_flip": False, "crop_scale": (0.9, 1.0)}),
    # crop_scale (1, 1) draws no crop numbers any more: test_whole_view_is_torchvisions_scale_one_crop...
]


@pytest.mark.parametrize(("mode", "settings"), SETTINGS)
def test_transform_is_bit_identical_to_the_pre_split_training_processor(mode, settings):
    """Same random numbers in the same order: seeded runs reproduce the old training processor."""
    img = _random_image()
    reference = _pre_split_training_pipeline(24, mode, **settings)
    ours = train_image_transform(24, mode, **settings)
    for seed in range(8):
        torch.manual_seed(seed)
        random.seed(seed)
        expected = torch.stack([reference(img) for _ in range(3)])
        torch.manual_seed(seed)
        random.seed(seed)
        got = torch.stack([ours(img) for _ in range(3)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (3, 3, 24, 24)


def test_training_matches_hand_built_torchvision_without_randaug():
    img = _random_image()
    vl = T.Compose([T.RandomResizedCrop(24, scale=(0.5, 1.0), interpolation=BICUBIC), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    imagenet = T.Compose([T.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IN_MEAN, IN_STD),
                          T.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")])
    for mode, reference in (("vl", vl), ("imagenet", imagenet)):
        ours = train_image_transform(24, mode, randaug=False)
        for seed in range(6):
            torch.manual_seed(seed)
            expected = reference(img)
            torch.manual_seed(seed)
            torch.testing.assert_close(ours(img), expected, rtol=0, atol=0)


def test_randaug_training_is_seeded_and_changes_images():
    img = _random_image()
    for mode in ("vl", "imagenet"):
        augmented = train_image_transform(24, mode)
        plain = train_image_transform(24, mode, randaug=False, random_erasing=0.0)
        torch.manual_seed(1)
        first = torch.stack([augmented(img) for _ in range(8)])
        torch.manual_seed(1)
        again = torch.stack([augmented(img) for _ in range(8)])
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert first.shape == (8, 3, 24, 24)
        torch.manual_seed(1)
        without = torch.stack([plain(img) for _ in range(8)])
        assert not torch.equal(first, without)


def test_mode_defaults_are_the_official_ones_and_shared_with_the_processor():
    imagenet = train_image_transform(224, "imagenet")
    assert imagenet.crop_scale == (0.08, 1.0) and imagenet.random_erasing == 0.25 and imagenet.randaug
    assert imagenet.mean == IN_MEAN == Beit3ImageProcessor(224, "imagenet").mean
    assert imagenet.std == IN_STD == Beit3ImageProcessor(224, "imagenet").std
    vl = train_image_transform(480, "vl")
    assert vl.crop_scale == (0.5, 1.0) and vl.random_erasing == 0.0 and vl.horizontal_flip
    assert vl.mean == vl.std == (0.5, 0.5, 0.5) == Beit3ImageProcessor(480, "vl").mean
    with pytest.raises(ValueError, match="mode"):
        train_image_transform(224, "clip")
    with pytest.raises(ValueError, match="image_size"):
        train_image_transform(0, "vl")


def test_transform_takes_every_input_kind(tmp_path):
    img = _random_image(30, 20)
    path = tmp_path / "pic.png"
    img.save(path)
    transform = train_image_transform(16, "imagenet")
    torch.manual_seed(3)
    expected = transform(img)
    for item in (path, str(path), path.read_bytes(), np.array(img)):
        torch.manual_seed(3)
        torch.testing.assert_close(transform(item), expected, rtol=0, atol=0)


def test_transform_pickles_for_data_loader_workers_and_logs_its_settings():
    transform = train_image_transform(24, "imagenet", crop_scale=(0.3, 1.0))
    restored = pickle.loads(pickle.dumps(transform))
    assert isinstance(restored, TrainImageTransform) and restored == transform
    img = _random_image()
    torch.manual_seed(0)
    expected = transform(img)
    torch.manual_seed(0)
    torch.testing.assert_close(restored(img), expected, rtol=0, atol=0)
    settings = transform.to_dict()
    assert settings == {"image_size": 24, "mode": "imagenet", "crop_scale": [0.3, 1.0], "horizontal_flip": True,
                        "randaug": True, "mean": list(IN_MEAN), "std": list(IN_STD), "random_erasing": 0.25}
    assert train_image_transform(**settings) == transform
    assert "crop_scale=(0.3, 1.0)" in repr(transform) and "RandomAugment" not in repr(transform)


def test_horizontal_flip_can_be_turned_off():
    """Training without flips keeps left and right (the synthetic world's labels say which)."""
    left_red = np.zeros((32, 32, 3), np.uint8)
    left_red[:, :16, 0] = 255
    transform = train_image_transform(32, "vl", randaug=False, crop_scale=(1.0, 1.0), horizontal_flip=False)
    for _ in range(20):
        pixels = transform(Image.fromarray(left_red))
        assert pixels[0, :, :8].mean() > pixels[0, :, -8:].mean()
    flipping = train_image_transform(32, "vl", randaug=False, crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    sides = {bool(flipping(Image.fromarray(left_red))[0, :, :8].mean() > 0) for _ in range(20)}
    assert sides == {True, False}


# ---------------------------------------------------------------------- captions
def test_mask_count_formula_by_hand():
    # count = max(1, min(int(n * p + 0.5), n - 1))
    cases = [(10, 0.6, 6), (2, 0.6, 1), (3, 0.6, 2), (5, 0.1, 1), (4, 1.0, 3), (7, 0.7, 5)]
    for n, p, count in cases:
        ids = torch.arange(10, 10 + n).view(1, n)
        _, positions = mask_caption_tokens(ids, torch.ones(1, n, dtype=torch.long), p, 99, 100)
        assert int(positions.sum()) == count, (n, p)


def test_captioning_masking_invariants_and_statistics(trained_tokenizer):
    captions = ["A cat sleeping on a wooden chair next to the window.", "A red car.",
                "Two dogs playing with a red ball on the grass."] * 200
    encoded = trained_tokenizer(captions, max_length=12, padding="max_length", truncation=True, return_tensors="pt")
    labels, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    assert DEFAULT_CAPTIONING_MASK_PROB == 0.6
    masked, positions = mask_caption_tokens(labels, attention_mask, DEFAULT_CAPTIONING_MASK_PROB,
                                            trained_tokenizer.mask_token_id, trained_tokenizer.vocab_size,
                                            torch.Generator().manual_seed(0))
    assert torch.equal(labels, trained_tokenizer(captions, max_length=12, padding="max_length", truncation=True, return_tensors="pt")["input_ids"])  # input not modified
    assert positions.dtype == torch.bool and positions.shape == labels.shape
    lengths = attention_mask.sum(1)
    assert not positions[:, 0].any()  # BOS never masked
    assert not (positions & (attention_mask == 0)).any()  # never padding
    counts = positions.sum(1)
    expected = torch.clamp(torch.minimum((lengths * 0.6 + 0.5).floor().long(), lengths - 1), min=1)
    assert torch.equal(counts, expected)
    assert torch.equal(masked[~positions], labels[~positions])

    picked_masked, picked_labels = masked[positions], labels[positions]
    mask_id = trained_tokenizer.mask_token_id
    share_mask = (picked_masked == mask_id).float().mean().item()
    share_kept = (picked_masked == picked_labels).float().mean().item()
    assert abs(share_mask - 0.8) < 0.03 and abs(share_kept - 0.1) < 0.03  # ~3400 picks
    others = picked_masked[(picked_masked != mask_id) & (picked_masked != picked_labels)]
    assert len(others) > 0 and others.min() >= 3 and others.max() <= trained_tokenizer.vocab_size - 1
    # EOS can be masked, as in the official code
    eos_pos = lengths - 1
    assert positions[torch.arange(len(captions)), eos_pos].any()


def test_masking_is_seeded_and_takes_a_probability(trained_tokenizer):
    encoded = trained_tokenizer(["A cat sleeping on a wooden chair.", "A red car."], max_length=64, padding="max_length", truncation=True, return_tensors="pt")

    def run(seed):
        return mask_caption_tokens(encoded["input_ids"], encoded["attention_mask"], 0.3,
                                   trained_tokenizer.mask_token_id, trained_tokenizer.vocab_size,
                                   torch.Generator().manual_seed(seed))

    (first_ids, first_positions), (again_ids, again_positions) = run(5), run(5)
    assert torch.equal(first_ids, again_ids) and torch.equal(first_positions, again_positions)
    lengths = encoded["attention_mask"].sum(1)
    assert first_positions.sum(1).tolist() == [max(1, min(int(n * 0.3 + 0.5), n - 1)) for n in lengths.tolist()]
    with pytest.raises(ValueError, match="mask_prob"):
        mask_caption_tokens(encoded["input_ids"], encoded["attention_mask"], 0.0, 4, 100)
    with pytest.raises(ValueError, match="at least BOS and EOS"):
        mask_caption_tokens(torch.tensor([[0, 1]]), torch.tensor([[1, 0]]), 0.5, 4, 100)


def test_whole_view_is_torchvisions_scale_one_crop_without_its_random_draws():
    """crop_scale (1, 1) (the tiny recipes): the pixels of RandomResizedCrop(scale=(1, 1)), which at
    scale 1 rejects nearly all of its ten random tries and falls back to the centred whole view."""
    agree = total = 0
    for width, height in ((48, 48), (48, 36), (30, 90), (90, 30), (333, 500)):
        img = _random_image(width, height)
        reference = T.Compose([T.RandomResizedCrop(24, scale=(1.0, 1.0), interpolation=BICUBIC),
                               T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        ours = train_image_transform(24, "vl", randaug=False, horizontal_flip=False, crop_scale=(1.0, 1.0))
        for seed in range(40):
            torch.manual_seed(seed)
            expected = reference(img)
            torch.manual_seed(seed)
            state = torch.random.get_rng_state()
            got = ours(img)
            assert torch.equal(torch.random.get_rng_state(), state)  # draws nothing
            agree += torch.equal(got, expected)
            total += 1
            if width == height:  # a square image is always the whole view
                assert torch.equal(got, expected)
    assert agree / total > 0.95, (agree, total)  # the rest: a try accepted with a crop a pixel smaller
