import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import beit3.data
from beit3.data.datasets import (
    BadImageError,
    BadSampleWarning,
    Collator,
    ImageClassificationDataset,
    ImageTextDataset,
    NLVR2Dataset,
    VQADataset,
    load_image,
    vqa_targets,
)
from beit3.data.index import EmptyDatasetError, IndexFormatError, write_jsonl

from .conftest import make_image


def pixels(image):
    return torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1).float()


def fake_processor(images=None, text=None):
    """Stands in for Beit3Processor: images -> (B, 3, 8, 8) or pairs -> (B, 2, 3, 8, 8), text -> lengths."""
    out = {}
    if images is not None and isinstance(images[0], tuple):
        out["pixel_values"] = torch.stack([torch.stack([pixels(left), pixels(right)]) for left, right in images])
    elif images is not None:
        out["pixel_values"] = torch.stack([pixels(image) for image in images])
    if text is not None:
        out["input_ids"] = torch.tensor([[len(t)] for t in text])
    return out


def test_datasets_read_the_synthetic_indexes(synthetic_world):
    index = synthetic_world / "index"
    vqa = VQADataset([index / "vqa.train.jsonl", index / "vqa.trainable_val.jsonl"])
    sample = vqa[0]
    assert isinstance(sample["image"], Image.Image) and sample["image"].size == (64, 64)
    assert isinstance(sample["text"], str) and len(sample["labels"]) == len(sample["scores"])
    nlvr2 = NLVR2Dataset(index / "nlvr2.train.index.jsonl")
    assert set(nlvr2[0]) == {"image", "image2", "text", "label", "index"}
    captioning = ImageTextDataset(index / "coco_captioning.test.jsonl")
    assert captioning[0]["text"] is None and len(captioning[0]["references"]) == 5
    classes = ImageClassificationDataset(index / "imagenet.val.index.jsonl", transform=lambda s: s["label"])
    assert classes[len(classes) - 1] == 23


def test_collator_builds_model_batches(synthetic_world):
    index = synthetic_world / "index"
    vqa = VQADataset(index / "vqa.train.jsonl")
    batch = Collator(fake_processor, num_labels=20)([vqa[0], vqa[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["input_ids"].shape == (2, 1)
    assert batch["labels"].shape == (2, 20) and batch["qid"].dtype == torch.long
    nlvr2 = NLVR2Dataset(index / "nlvr2.train.index.jsonl")
    batch = Collator(fake_processor)([nlvr2[0], nlvr2[1], nlvr2[2]])
    assert batch["pixel_values"].shape == (3, 2, 3, 8, 8)
    assert batch["labels"].tolist() == [nlvr2.rows[i][1]["label"] for i in range(3)]
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    with pytest.raises(ValueError, match="num_labels"):
        Collator(fake_processor)([vqa[0]])


def test_every_sample_carries_the_index_asked_for(synthetic_world):
    index = synthetic_world / "index"
    datasets = [VQADataset(index / "vqa.train.jsonl"), NLVR2Dataset(index / "nlvr2.train.index.jsonl"),
                ImageTextDataset(index / "coco_captioning.test.jsonl"),
                ImageClassificationDataset(index / "imagenet.val.index.jsonl")]
    for dataset in datasets:
        for i in (0, 3, len(dataset) - 1):
            assert dataset[i]["index"] == i and type(dataset[i]["index"]) is int
    seen = ImageClassificationDataset(index / "imagenet.val.index.jsonl", transform=lambda s: s["index"])
    assert seen[np.int64(5)] == 5 and type(seen[np.int64(5)]) is int


def test_images_load_with_the_processing_loader(tmp_path):
    """One loader for data and inference: EXIF orientation applied, transparency onto white."""
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    write_jsonl(tmp_path / "index.jsonl", [{"image_path": "alpha.png", "label": 0},
                                           {"image_path": "rotated.jpg", "label": 1}])
    dataset = ImageClassificationDataset(tmp_path / "index.jsonl", strict=True)
    alpha = dataset[0]["image"]
    assert alpha.mode == "RGB" and alpha.getpixel((0, 0)) == (255, 0, 0) and alpha.getpixel((5, 0)) == (255, 255, 255)
    assert dataset[1]["image"].size == (20, 40)
    assert beit3.data.load_image is load_image
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png.*0 bytes"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(BadImageError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


def test_vqa_targets_are_dense_soft_scores():
    targets = vqa_targets([[2, 0], []], [[0.3, 1.0], []], 4)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))


@pytest.fixture
def index_with_bad_images(tmp_path):
    make_image(tmp_path / "good0.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    make_image(tmp_path / "good1.png", (0, 0, 200))
    rows = [{"image_path": p, "label": n} for n, p in enumerate(["good0.png", "corrupt.png", "missing.png", "good1.png"])]
    write_jsonl(tmp_path / "index.jsonl", rows)
    return tmp_path / "index.jsonl"


def test_corrupt_or_missing_image_is_skipped_with_a_warning_and_counted(index_with_bad_images):
    dataset = ImageClassificationDataset(index_with_bad_images)
    with pytest.warns(BadSampleWarning) as record:
        sample = dataset[1]
    assert ["corrupt.png" in str(w.message) for w in record] == [True, False]
    assert "missing.png" in str(record[1].message)
    assert sample["label"] == 3  # fell forward past the corrupt and the missing file
    assert sample["index"] == 1  # the index asked for, so an epoch's indexes stay distinct
    assert dataset.skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[0]["label"] == 0


def test_strict_raises_on_a_bad_image(index_with_bad_images):
    dataset = ImageClassificationDataset(index_with_bad_images, strict=True)
    with pytest.raises(BadImageError, match="missing.png"):
        dataset[2]


def test_malformed_index_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image_path": "a.png", "label": 1}\n\n{"image_path": "b.png"}\n')
    with pytest.raises(IndexFormatError, match=r"bad.jsonl:3: missing field\(s\) label"):
        ImageClassificationDataset(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image_path": "a.png", "label": 1}\n{"image_path": \n')
    with pytest.raises(IndexFormatError, match=r"bad.jsonl:2: not valid JSON"):
        ImageClassificationDataset(tmp_path / "bad.jsonl")


def test_empty_dataset_is_an_error_before_training(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EmptyDatasetError, match="no sample"):
        ImageClassificationDataset(tmp_path / "empty.jsonl")
    with pytest.raises(EmptyDatasetError):
        write_jsonl(tmp_path / "never.jsonl", [])
    assert not (tmp_path / "never.jsonl").exists()


def test_labels_outside_the_head_name_the_index_file_line_and_value(tmp_path):
    """Issue 21 item 17: checked when the dataset is built (not a crash at step 1, not a silent pass)."""
    index = tmp_path / "cls.jsonl"
    index.write_text('{"image_path": "a.png", "label": 1}\n\n{"image_path": "b.png", "label": 3}\n')
    assert len(ImageClassificationDataset(index, num_classes=4)) == 2
    with pytest.raises(IndexFormatError, match=r"cls\.jsonl:3: label 3 is outside 0\.\.2 \(3 classes"):
        ImageClassificationDataset(index, num_classes=3)
    index.write_text('{"image_path": "a.png", "label": "cat"}\n')
    with pytest.raises(IndexFormatError, match=r"cls\.jsonl:1: label 'cat' is not a whole number"):
        ImageClassificationDataset(index, num_classes=3)

    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text('{"image_path": "a.png", "text": "q", "qid": 1, "labels": [0, 5], "scores": [1.0, 0.3]}\n')
    assert len(VQADataset(vqa, num_labels=6)) == 1
    with pytest.raises(IndexFormatError, match=r"vqa\.jsonl:1: answer label 5 is outside 0\.\.3"):
        VQADataset(vqa, num_labels=4)

    pairs = tmp_path / "nlvr2.jsonl"
    pairs.write_text('{"image_path": "a.png", "image2_path": "b.png", "text": "s", "label": 1}\n'
                     '{"image_path": "a.png", "image2_path": "b.png", "text": "s", "label": 2}\n')
    with pytest.raises(IndexFormatError, match=r"nlvr2\.jsonl:2: label 2 is not 0 \(false\) or 1 \(true\)"):
        NLVR2Dataset(pairs)


def test_unreadable_rows_are_recorded_for_evaluation(index_with_bad_images):
    """Issue 21 item 10: the substitute keeps training batches full; bad_rows says which rows it replaced."""
    dataset = ImageClassificationDataset(index_with_bad_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for i in range(len(dataset)):
            dataset[i]
    assert sorted(dataset.bad_rows) == [i for i, (_, row) in enumerate(dataset.rows)
                                        if "missing" in row["image_path"] or "corrupt" in row["image_path"]]
    assert {"corrupt.png", "missing.png"} == {name for name in ("corrupt.png", "missing.png")
                                             for reason in dataset.bad_rows.values() if name in reason}


def test_decoded_images_are_cached_once_within_budget_and_copies_are_returned(tmp_path, monkeypatch):
    import beit3.processing.image as processing_image

    for n in range(3):
        make_image(tmp_path / f"img{n}.png", (40 * n, 0, 0))
    write_jsonl(tmp_path / "index.jsonl", [{"image_path": f"img{n % 3}.png", "label": n % 3} for n in range(6)])
    decoded = []
    real_decode = processing_image._decode
    monkeypatch.setattr(processing_image, "_decode", lambda *a: decoded.append(a[1]) or real_decode(*a))

    dataset = ImageClassificationDataset(tmp_path / "index.jsonl")
    first = [pixels(dataset[i]["image"]) for i in range(6)]
    assert len(decoded) == 3  # six rows, three files: each decoded once
    assert (dataset.images.hits, dataset.images.misses, len(dataset.images)) == (3, 3, 3)
    assert dataset.images.used_bytes == 3 * 8 * 8 * 3
    dataset[0]["image"].paste((255, 255, 255), (0, 0, 8, 8))  # a transform changing its image in place
    assert torch.equal(pixels(dataset[0]["image"]), first[0])  # does not change the cached one
    assert all(torch.equal(pixels(dataset[i]["image"]), first[i]) for i in range(6))
    assert len(decoded) == 3

    # A budget of two images keeps two; the third is decoded at every read.
    decoded.clear()
    small = ImageClassificationDataset(tmp_path / "index.jsonl", image_cache_mb=2 * 8 * 8 * 3 / 2**20)
    for _ in range(2):
        [small[i] for i in range(3)]
    assert (len(small.images), len(decoded)) == (2, 4)
    off = ImageClassificationDataset(tmp_path / "index.jsonl", image_cache_mb=0)
    decoded.clear()
    [off[i] for i in range(6)]
    assert (len(off.images), len(decoded)) == (0, 6)


def test_image_max_side_shrinks_large_images_keeping_their_aspect(tmp_path):
    Image.new("RGB", (400, 100), (10, 200, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 60), (10, 200, 30)).save(tmp_path / "small.png")
    write_jsonl(tmp_path / "index.jsonl", [{"image_path": "wide.png", "label": 0}, {"image_path": "small.png", "label": 1}])
    dataset = ImageClassificationDataset(tmp_path / "index.jsonl", image_max_side=64)
    assert dataset[0]["image"].size == (64, 16)
    assert dataset[1]["image"].size == (20, 60)  # smaller images are left as they are
    assert np.array(dataset[0]["image"])[8, 32].tolist() == [10, 200, 30]
    with pytest.raises(ValueError, match="image_max_side"):
        ImageClassificationDataset(tmp_path / "index.jsonl", image_max_side=0)
    with pytest.raises(ValueError, match="budget"):
        ImageClassificationDataset(tmp_path / "index.jsonl", image_cache_mb=-1)


def test_the_image_cache_keeps_any_value_within_its_budget():
    from beit3.data.datasets import ImageCache

    cache, loads = ImageCache(max_bytes=10), []

    def load(value):
        loads.append(value)
        return {"value": value}

    first = cache.cached(("pairs", 0), lambda: load(0), lambda v: 6)
    assert cache.cached(("pairs", 0), lambda: load(99), lambda v: 6) is first  # stored, not copied
    cache.cached(("pairs", 1), lambda: load(1), lambda v: 6)  # over the budget: returned, not kept
    cache.cached(("pairs", 1), lambda: load(1), lambda v: 6)
    assert loads == [0, 1, 1] and (cache.hits, cache.misses, cache.used_bytes, len(cache)) == (1, 3, 6, 1)
