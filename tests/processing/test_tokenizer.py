"""Beit3Tokenizer: XLM-R id layout, encode/decode, batching, persistence and errors."""
from __future__ import annotations

import shutil
import unicodedata

import pytest
import sentencepiece as spm
import torch

from beit3.processing import Beit3Tokenizer

from .conftest import CORPUS, EXTERNAL_SPM

LINES = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_external_model_ids_are_spm_ids_shifted_by_one(external_tokenizer):
    # bpe_external.model alone gives pieces ▁A ▁c at ▁s le e p ing = ids 35 11 50 8 34 377 394 33
    # (read once with sentencepiece); XLM-R adds one and wraps in <s>=0 ... </s>=2.
    assert external_tokenizer.encode("A cat sleeping") == [0, 36, 12, 51, 9, 35, 378, 395, 34, 2]
    assert external_tokenizer.encode("A cat sleeping", add_special_tokens=False) == [36, 12, 51, 9, 35, 378, 395, 34]
    assert external_tokenizer.tokenize("A cat sleeping") == ["▁A", "▁c", "at", "▁s", "le", "e", "p", "ing"]


def test_special_ids_and_sizes(trained_tokenizer, external_tokenizer):
    for tok, pieces in ((trained_tokenizer, 800), (external_tokenizer, 900)):
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.mask_token_id == pieces + 1  # 64001 for the official 64000 pieces
        assert tok.vocab_size == len(tok) == pieces + 2
        assert tok.convert_ids_to_tokens([0, 1, 2, 3, pieces + 1]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, pieces + 1]


def test_every_piece_maps_to_spm_id_plus_one(trained_tokenizer):
    sp = spm.SentencePieceProcessor(model_proto=trained_tokenizer.model_proto)
    for i in range(3, sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        assert trained_tokenizer.convert_tokens_to_ids(piece) == i + 1
        assert trained_tokenizer.convert_ids_to_tokens(i + 1) == piece


def test_unknown_characters_become_unk(external_tokenizer):
    # "Ω" never occurs in the training text; SentencePiece returns its unknown id 0 -> 3.
    assert external_tokenizer.encode("Ω", add_special_tokens=False)[-1] == 3
    assert external_tokenizer.convert_tokens_to_ids("not-a-piece") == 3


def test_special_tokens_written_in_text(external_tokenizer):
    mask = external_tokenizer.mask_token_id
    # <mask> swallows the space before it (lstrip), as Hugging Face's XLM-R tokenizer does.
    assert external_tokenizer.tokenize("A cat <mask> sleeping") == ["▁A", "▁c", "at", "<mask>", "▁s", "le", "e", "p", "ing"]
    assert external_tokenizer.encode("A cat <mask>", add_special_tokens=False) == [36, 12, 51, mask]
    assert external_tokenizer.encode("A</s>", add_special_tokens=False) == [36, 2]


def test_multilingual_round_trip(trained_tokenizer, external_tokenizer):
    for line in LINES:
        # identity normalisation: exact; the trained model applies SentencePiece's NFKC rules.
        assert external_tokenizer.decode(external_tokenizer.encode(line)) == line
        assert trained_tokenizer.decode(trained_tokenizer.encode(line)) == unicodedata.normalize("NFKC", line)
    ids = trained_tokenizer.encode("一只猫睡在窗边的木椅上。")
    assert 3 not in ids and ids[0] == 0 and ids[-1] == 2


def test_decode_special_tokens(external_tokenizer):
    ids = external_tokenizer.encode("A cat") + [1, 1]
    assert external_tokenizer.decode(ids) == "A cat"
    assert external_tokenizer.decode(ids, skip_special_tokens=False) == "<s> A cat </s> <pad> <pad>"
    # ids past the vocabulary (the model's unused rows 64002..64009) read as <unk>
    beyond = external_tokenizer.vocab_size + 3
    assert external_tokenizer.decode([36, beyond], skip_special_tokens=False) == "A <unk>"
    assert external_tokenizer.decode(torch.tensor([0, 36, 2])) == "A"
    assert external_tokenizer.batch_decode(torch.tensor([[0, 36, 2], [0, 12, 2]])) == ["A", "c"]
    with pytest.raises(ValueError, match="negative"):
        external_tokenizer.decode([-1])


def test_truncation_keeps_bos_and_eos(trained_tokenizer):
    text = LINES[-4]  # a long English sentence
    content = trained_tokenizer.encode(text, add_special_tokens=False)
    assert len(content) > 10
    out = trained_tokenizer([text], max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    assert out["input_ids"].tolist() == [[0, *content[:6], 2]]
    assert out["attention_mask"].tolist() == [[1] * 8]
    assert out["input_ids"].dtype == torch.long


def test_mixed_length_batch_pads_right(trained_tokenizer):
    short, long = "A cat.", "Two dogs playing with a red ball on the grass."
    a = trained_tokenizer.encode(short)
    b = trained_tokenizer.encode(long)
    out = trained_tokenizer([short, long], max_length=32, padding="max_length", truncation=True, return_tensors="pt")
    assert out["input_ids"].shape == (2, 32)
    assert out["input_ids"][0].tolist() == a + [1] * (32 - len(a))
    assert out["input_ids"][1].tolist() == b + [1] * (32 - len(b))
    assert out["attention_mask"][0].tolist() == [1] * len(a) + [0] * (32 - len(a))
    longest = trained_tokenizer([short, long], padding="longest", return_tensors="pt")
    assert longest["input_ids"].shape == (2, len(b))
    assert longest["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    lists = trained_tokenizer([short, long], padding=False, return_tensors=None)
    assert lists["input_ids"] == [a, b]
    with pytest.raises(ValueError, match="different lengths"):
        trained_tokenizer([short, long], padding=False, return_tensors="pt")


def test_pretokenized_ids_like_official_index_files(trained_tokenizer):
    ids = trained_tokenizer.encode("A red car.", add_special_tokens=False)
    out = trained_tokenizer([ids, "A red car."], max_length=16, padding="max_length", truncation=True, return_tensors="pt")
    assert out["input_ids"][0].tolist() == out["input_ids"][1].tolist()
    with pytest.raises(ValueError, match="outside"):
        trained_tokenizer([[5, 10 ** 6]])


def test_no_truncation_too_long_is_an_error(trained_tokenizer):
    with pytest.raises(ValueError, match="max_length=4"):
        trained_tokenizer(["A cat sleeping on a wooden chair."], max_length=4, padding="max_length", truncation=False)


def test_save_and_load_round_trip(tmp_path, trained_tokenizer):
    written = trained_tokenizer.save_pretrained(tmp_path / "tok")
    assert {p.name for p in written} == {"sentencepiece.model", "tokenizer_config.json"}
    loaded = Beit3Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.vocab_size == trained_tokenizer.vocab_size
    assert loaded.mask_token_id == trained_tokenizer.mask_token_id
    assert [loaded.encode(line) for line in LINES] == [trained_tokenizer.encode(line) for line in LINES]


def test_directory_with_one_official_style_spm_file(tmp_path, external_tokenizer):
    shutil.copyfile(EXTERNAL_SPM, tmp_path / "beit3.spm")
    assert Beit3Tokenizer.from_pretrained(tmp_path).encode("A cat") == external_tokenizer.encode("A cat")
    assert Beit3Tokenizer.from_pretrained(tmp_path / "beit3.spm").vocab_size == 902
    shutil.copyfile(EXTERNAL_SPM, tmp_path / "other.model")
    with pytest.raises(FileNotFoundError, match="beit3.spm, other.model"):
        Beit3Tokenizer.from_pretrained(tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.spm"):
        Beit3Tokenizer(tmp_path / "missing.spm")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Beit3Tokenizer.from_pretrained(tmp_path / "nowhere")
    text = tmp_path / "notes.model"
    text.write_text("this is not a model")
    with pytest.raises(ValueError, match="notes.model' is not a SentencePiece model"):
        Beit3Tokenizer(text)
    empty = tmp_path / "empty.spm"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Beit3Tokenizer(empty)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tokenizer_config.json").write_text('{"lowercase": true}')
    with pytest.raises(ValueError, match="unknown keys"):
        Beit3Tokenizer.from_pretrained(tmp_path / "cfg")


def test_models_with_another_id_layout_are_rejected(tmp_path):
    # pad at 0 and unk at 1: under the XLM-R shift its pieces would collide with <pad>/</s>.
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "odd"), vocab_size=600,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    with pytest.raises(ValueError, match="XLM-R layout"):
        Beit3Tokenizer(tmp_path / "odd.model")
