"""Beit3Processor: per-task batches, captioning masking and persistence."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from beit3.processing import Beit3ImageProcessor, Beit3Processor, mask_caption_tokens

RED, BLUE = Image.new("RGB", (20, 30), (255, 0, 0)), Image.new("RGB", (30, 20), (0, 0, 255))


@pytest.fixture()
def processor(trained_tokenizer) -> Beit3Processor:
    return Beit3Processor(trained_tokenizer, Beit3ImageProcessor(16, "vl"), max_length=12)


def test_vqa_batch(processor, trained_tokenizer):
    questions = ["What colour is it?", "Is the cat asleep on the chair by the window?"]
    batch = processor(images=[RED, BLUE], text=questions, task="vqav2")
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    expected = trained_tokenizer(questions, max_length=12)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"][1, -1] == 2  # truncated, EOS kept


def test_nlvr2_pairs(processor):
    batch = processor(images=[(RED, BLUE), (BLUE, RED)], text=["left red", "left blue"], task="nlvr2",
                      max_length=8)
    assert batch["pixel_values"].shape == (2, 2, 3, 16, 16)
    assert batch["input_ids"].shape == (2, 8)
    red_channel = batch["pixel_values"][:, :, 0, 0, 0]  # 1 for red, -1 for blue
    assert red_channel.tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    assert processor(images=(RED, BLUE), text="one pair", task="nlvr2")["pixel_values"].shape == (1, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="pairs"):
        processor(images=[RED, BLUE, RED], text=["a", "b", "c"], task="nlvr2")


def test_classification_and_retrieval(processor):
    assert set(processor(images=[RED], task="classification")) == {"pixel_values"}
    with pytest.raises(ValueError, match="images only"):
        processor(images=[RED], text=["red"], task="classification")
    assert set(processor(text=["a red square"], task="retrieval")) == {"input_ids", "attention_mask"}
    assert set(processor(images=[RED], task="retrieval")) == {"pixel_values"}
    assert set(processor(images=[RED], task="captioning")) == {"pixel_values"}  # inference


def test_clear_errors(processor):
    with pytest.raises(ValueError, match="unknown task"):
        processor(images=[RED], task="segmentation")
    with pytest.raises(ValueError, match="needs text"):
        processor(images=[RED], task="vqav2")
    with pytest.raises(ValueError, match="needs images"):
        processor(text=["q"], task="vqav2")
    with pytest.raises(ValueError, match="2 images .* 1 texts"):
        processor(images=[RED, BLUE], text=["q"], task="vqav2")
    with pytest.raises(ValueError, match="captions to mask"):
        processor(images=[RED], task="captioning", train=True)


def test_mask_count_formula_by_hand():
    # count = max(1, min(int(n * p + 0.5), n - 1))
    cases = [(10, 0.6, 6), (2, 0.6, 1), (3, 0.6, 2), (5, 0.1, 1), (4, 1.0, 3), (7, 0.7, 5)]
    for n, p, count in cases:
        ids = torch.arange(10, 10 + n).view(1, n)
        _, positions = mask_caption_tokens(ids, torch.ones(1, n, dtype=torch.long), p, 99, 100)
        assert int(positions.sum()) == count, (n, p)


def test_captioning_masking_invariants_and_statistics(processor, trained_tokenizer):
    captions = ["A cat sleeping on a wooden chair next to the window.", "A red car.",
                "Two dogs playing with a red ball on the grass."] * 200
    generator = torch.Generator().manual_seed(0)
    batch = processor(images=[RED] * len(captions), text=captions, task="captioning", train=True,
                      max_length=12, generator=generator)
    assert set(batch) == {"pixel_values", "input_ids", "labels", "masked_positions", "attention_mask"}
    labels, masked, positions = batch["labels"], batch["input_ids"], batch["masked_positions"]
    assert torch.equal(labels, trained_tokenizer(captions, max_length=12)["input_ids"])
    assert positions.dtype == torch.bool and positions.shape == labels.shape
    lengths = batch["attention_mask"].sum(1)
    assert not positions[:, 0].any()  # BOS never masked
    assert not (positions & (batch["attention_mask"] == 0)).any()  # never padding
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


def test_masking_is_seeded_and_takes_a_probability(processor):
    captions = ["A cat sleeping on a wooden chair.", "A red car."]
    run = lambda seed: processor(images=[RED, BLUE], text=captions, task="captioning",  # noqa: E731
                                 captioning_mask_prob=0.3, generator=torch.Generator().manual_seed(seed))
    first, again = run(5), run(5)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["masked_positions"], again["masked_positions"])
    lengths = first["attention_mask"].sum(1)
    assert first["masked_positions"].sum(1).tolist() == [max(1, min(int(n * 0.3 + 0.5), n - 1)) for n in lengths.tolist()]
    with pytest.raises(ValueError, match="mask_prob"):
        processor(images=[RED], text=["x"], task="captioning", captioning_mask_prob=0.0)


def test_save_and_load_round_trip(tmp_path, processor):
    written = processor.save_pretrained(tmp_path)
    assert {p.name for p in written} == {"sentencepiece.model", "tokenizer_config.json",
                                         "preprocessor_config.json", "processor_config.json"}
    loaded = Beit3Processor.from_pretrained(tmp_path)
    assert loaded.max_length == 12
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    a = processor(images=[RED], text=["a red square"], task="vqav2")
    b = loaded(images=[RED], text=["a red square"], task="vqav2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="nothing"):
        Beit3Processor.from_pretrained(tmp_path / "nothing")
