"""The per-sample work of the pretraining data: the augmentation's rules and the decoded-sample cache."""
from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from beit3.pretraining.data import MaskedDataModelingDataset, MaskedSamples, PretrainingTransform, seeded_draws


def _photo(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_evaluation_pixels_are_torchvision_s_resize_to_tensor_normalize():
    image = _photo()
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])(image)
    ours = PretrainingTransform(32, train=False)(image)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.allclose(ours, reference, atol=1e-6)
    # a training crop of the whole image, unflipped and unjittered, is the same resize
    whole = PretrainingTransform(32, train=True, crop_scale=(1.0, 1.0), color_jitter=0.0, horizontal_flip=False)
    square = _photo(64, 64)
    assert torch.allclose(whole(square), PretrainingTransform(32, train=False)(square), atol=1e-6)


def test_crop_boxes_follow_random_resized_crop_s_rule():
    transform = PretrainingTransform(32, train=True, crop_scale=(0.2, 1.0))
    torch.manual_seed(0)
    boxes = np.array([transform._crop_box(200, 100) for _ in range(4000)])
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 100).all()
    area = width * height / (200 * 100)
    aspect = width / height
    # rounding to whole pixels moves the area and the aspect a little past their ranges
    assert area.min() > 0.18 and area.max() <= 1.0 and aspect.min() > 0.7 and aspect.max() < 1.4
    # RandomResizedCrop on the same image: the same distribution of areas (its draws are torchvision's own)
    reference = np.array([T.RandomResizedCrop.get_params(Image.new("RGB", (200, 100)), [0.2, 1.0], [3 / 4, 4 / 3])
                          for _ in range(4000)])
    ref_area = reference[:, 2] * reference[:, 3] / (200 * 100)
    assert abs(area.mean() - ref_area.mean()) < 4 * ref_area.std() / math.sqrt(4000) * math.sqrt(2)
    slack = 200 - width  # the left edge is uniform over the places the box fits
    assert abs((boxes[slack > 0, 0] / slack[slack > 0]).mean() - 0.5) < 0.03
    # nothing fits: the centre crop at the nearest allowed aspect
    tall = PretrainingTransform(32, train=True, crop_scale=(1.0, 1.0))
    assert tall._crop_box(10, 100) == (0, 43, 10, 56)


class _CountingSource:
    def __init__(self, kind: str) -> None:
        self.kind, self.loads = kind, 0

    def load(self, ref: int) -> dict:
        self.loads += 1
        sample = {"__key__": str(ref)}
        if self.kind in ("images", "pairs"):
            sample["image"] = _photo(16, 16)
        if self.kind in ("texts", "pairs"):
            sample["text"] = f"sample {ref}"
        return sample


class _Tokenizer:
    bos_token_id, eos_token_id, pad_token_id, mask_token_id, vocab_size = 0, 2, 1, 3, 50

    def __call__(self, texts, max_length, **_):
        ids = torch.full((1, max_length), 1)
        ids[0, :4] = torch.tensor([0, 10, 11, 2])
        return {"input_ids": ids, "attention_mask": (ids != 1).long()}


def _dataset(cache_mb: float) -> tuple[MaskedDataModelingDataset, dict[str, _CountingSource]]:
    sources = {kind: _CountingSource(kind) for kind in ("images", "texts", "pairs")}
    samples = MaskedSamples(_Tokenizer(), image_size=16, patch_size=4, crop_scale=(0.5, 1.0))
    data = MaskedDataModelingDataset(*((sources[k], list(range(6))) for k in ("images", "texts", "pairs")), samples,
                                     image_cache_mb=cache_mb)
    return data, sources


def test_samples_are_decoded_once_and_masked_anew_each_epoch():
    data, sources = _dataset(cache_mb=1)
    first = [data[i] for i in range(6)]
    data.set_epoch(1)
    second = [data[i] for i in range(6)]
    assert {kind: source.loads for kind, source in sources.items()} == {"images": 6, "texts": 6, "pairs": 6}
    # the cache keeps decoded samples, not the augmented or masked ones: epoch 1 draws anew
    assert any(not torch.equal(a["image_mask"], b["image_mask"]) for a, b in zip(first, second))
    assert any(not torch.equal(a["image_pixel_values"], b["image_pixel_values"]) for a, b in zip(first, second))
    # and the same epoch and index give the same sample, cached or not
    data.set_epoch(0)
    uncached, _ = _dataset(cache_mb=0)
    for i in range(6):
        for key in ("image_pixel_values", "image_mask", "text_input_ids", "pair_labels"):
            assert torch.equal(data[i][key], uncached[i][key]) and torch.equal(data[i][key], first[i][key])


def test_the_cache_stops_at_its_budget():
    data, sources = _dataset(cache_mb=2 * 16 * 16 * 3 / 2**20)  # room for two 16 x 16 images
    for _ in range(2):
        for i in range(6):
            data[i]
    # texts cost nothing and stay; two images were kept (the first two read), the rest decoded again
    assert sources["texts"].loads == 6
    assert sources["images"].loads + sources["pairs"].loads == 2 * 12 - 2


def test_seeded_draws_give_the_masks_of_the_sample():
    samples = MaskedSamples(_Tokenizer(), image_size=16, patch_size=4)
    with seeded_draws([0, 1]) as rng:
        a = samples.masker(2, rng)
    with seeded_draws([0, 1]) as rng:
        b = samples.masker(2, rng)
    assert torch.equal(a, b) and a.sum(1).tolist() == [6, 6]
