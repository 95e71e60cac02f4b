"""Beit3Processor: batches from images, pairs and text (no task names), and persistence."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from beit3.processing import Beit3ImageProcessor, Beit3Processor

RED, BLUE = Image.new("RGB", (20, 30), (255, 0, 0)), Image.new("RGB", (30, 20), (0, 0, 255))


@pytest.fixture()
def processor(trained_tokenizer) -> Beit3Processor:
    return Beit3Processor(trained_tokenizer, Beit3ImageProcessor(16, "vl"), max_length=12)


def test_image_text_batch(processor, trained_tokenizer):
    questions = ["What colour is it?", "Is the cat asleep on the chair by the window?"]
    batch = processor(images=[RED, BLUE], text=questions)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    expected = trained_tokenizer(questions, max_length=12, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"][1, -1] == 2  # truncated, EOS kept


def test_image_pairs(processor):
    batch = processor(images=[(RED, BLUE), [BLUE, RED]], text=["left red", "left blue"], max_length=8)
    assert batch["pixel_values"].shape == (2, 2, 3, 16, 16)
    assert batch["input_ids"].shape == (2, 8)
    red_channel = batch["pixel_values"][:, :, 0, 0, 0]  # 1 for red, -1 for blue
    assert red_channel.tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    assert processor(images=[(RED, BLUE)], text="one pair")["pixel_values"].shape == (1, 2, 3, 16, 16)
    # a tuple of images is a batch of images, not a pair
    assert processor(images=(RED, BLUE))["pixel_values"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="mix"):
        processor(images=[(RED, BLUE), RED], text=["a", "b"])
    with pytest.raises(ValueError, match="2 images .* got 3"):
        processor(images=[(RED, BLUE, RED)], text=["a"])


def test_images_or_text_alone(processor):
    assert set(processor(images=[RED])) == {"pixel_values"}
    assert processor(images=RED)["pixel_values"].shape == (1, 3, 16, 16)
    assert set(processor(text=["a red square"])) == {"input_ids", "attention_mask"}
    assert processor(text="a red square", max_length=6)["input_ids"].shape == (1, 6)


def test_clear_errors(processor):
    with pytest.raises(ValueError, match="give images, text or both"):
        processor()
    with pytest.raises(ValueError, match="2 images .* 1 texts"):
        processor(images=[RED, BLUE], text=["q"])
    with pytest.raises(ValueError, match="1 images .* 2 texts"):
        processor(images=[(RED, BLUE)], text=["a", "b"])
    with pytest.raises(ValueError, match="no images"):
        processor(images=[])
    for removed in ({"task": "vqav2"}, {"train": True}, {"captioning_mask_prob": 0.6}):
        with pytest.raises(TypeError):
            processor(images=[RED], text=["q"], **removed)
    with pytest.raises(TypeError):
        processor([RED], ["q"], 8)  # max_length is keyword-only


def test_save_and_load_round_trip(tmp_path, processor):
    written = processor.save_pretrained(tmp_path)
    assert {p.name for p in written} == {"sentencepiece.model", "tokenizer_config.json",
                                         "preprocessor_config.json", "processor_config.json"}
    loaded = Beit3Processor.from_pretrained(tmp_path)
    assert loaded.max_length == 12
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    a = processor(images=[RED], text=["a red square"])
    b = loaded(images=[RED], text=["a red square"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="nothing"):
        Beit3Processor.from_pretrained(tmp_path / "nothing")
