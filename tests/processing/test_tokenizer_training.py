"""Tokenizer training and extension, the `beit3 tokenizer` CLI and the model-resize step."""
from __future__ import annotations

import argparse

import pytest
import sentencepiece as spm
import torch

from beit3.processing import (Beit3ImageProcessor, Beit3Tokenizer, extend_tokenizer, split_long_line,
                              train_tokenizer)
from beit3.processing.commands import register

from .conftest import CORPUS

LINES = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
ENGLISH = [line for line in LINES if line.isascii()]
RUSSIAN = [line for line in LINES if any("\u0400" <= ch <= "\u04ff" for ch in line)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    (root / "en.txt").write_text("\n".join(ENGLISH) + "\n", encoding="utf-8")
    (root / "ru.txt").write_text("\n".join(RUSSIAN) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def english_tokenizer(corpora) -> Beit3Tokenizer:
    return train_tokenizer([corpora / "en.txt"], 300, progress=False, num_threads=1)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="beit3")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------- long lines
def test_split_long_line_respects_bytes_words_and_characters():
    assert split_long_line("short line") == ["short line"]
    words = " ".join(f"word{i}" for i in range(2000))  # 17.8 KB
    chunks = split_long_line(words, 4192)
    sizes = [len(c.encode("utf-8")) for c in chunks]
    assert len(chunks) == 5 and max(sizes) <= 4192 and min(sizes[:-1]) > 4180  # cut at the last space
    assert " ".join(chunks).split() == words.split()  # cuts only between words
    cjk = "猫" * 3000  # 9000 bytes, no spaces: cut between 3-byte characters
    chunks = split_long_line(cjk, 4192)
    assert [len(c) for c in chunks] == [1397, 1397, 206] and "".join(chunks) == cjk


def test_long_lines_are_split_not_dropped(tmp_path):
    corpus = tmp_path / "long.txt"
    # The made-up word only occurs inside one 11 KB line, which SentencePiece alone would skip.
    corpus.write_text(CORPUS.read_text(encoding="utf-8") + "zyqxwvkj " * 1200 + "\n", encoding="utf-8")
    tokenizer = train_tokenizer([corpus], 800, progress=False, num_threads=1, character_coverage=1.0)
    assert tokenizer.tokenize("zyqxwvkj") == ["▁zyqxwvkj"]


# ---------------------------------------------------------------------- training
def test_trained_model_uses_the_xlmr_layout(trained_tokenizer):
    sp = spm.SentencePieceProcessor(model_proto=trained_tokenizer.model_proto)
    assert sp.get_piece_size() == 800
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.pad_id() == -1  # <pad> comes from the tokenizer, as in XLM-R


def test_training_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"too small for vocab_size=5000.*at most 1\d{3} pieces"):
        train_tokenizer([CORPUS], 5000, progress=False, num_threads=1)
    with pytest.raises(ValueError, match="cannot hold the .* characters"):
        train_tokenizer([CORPUS], 100, progress=False, num_threads=1, character_coverage=1.0)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], 100, progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([blank], 100, progress=False, num_threads=1)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' line 1 is not UTF-8"):
        train_tokenizer([latin1], 100, progress=False, num_threads=1)


# ---------------------------------------------------------------------- extending
def test_extend_keeps_every_old_id(english_tokenizer, corpora, tmp_path):
    extended = extend_tokenizer(english_tokenizer, [corpora / "ru.txt"], 100, tmp_path / "ext",
                                progress=False, num_threads=1)
    old_sp = spm.SentencePieceProcessor(model_proto=english_tokenizer.model_proto)
    assert extended.vocab_size == english_tokenizer.vocab_size + 100
    assert extended.mask_token_id == english_tokenizer.mask_token_id == 301
    for i in range(3, old_sp.get_piece_size()):  # every old piece keeps its id
        piece = old_sp.id_to_piece(i)
        assert extended.convert_tokens_to_ids(piece) == english_tokenizer.convert_tokens_to_ids(piece)
    # new pieces take ids 302..401, after <mask>
    new_ids = {extended.convert_tokens_to_ids(extended.convert_ids_to_tokens(i)) for i in range(302, 402)}
    assert new_ids == set(range(302, 402))
    for line in ENGLISH:  # Cyrillic pieces never match Latin text
        assert extended.encode(line) == english_tokenizer.encode(line)
    russian = "Кошка спит на деревянном стуле у окна."
    assert english_tokenizer.encode(russian).count(3) > 5  # all <unk> before
    assert 3 not in extended.encode(russian)
    assert extended.decode(extended.encode(russian)) == russian
    reloaded = Beit3Tokenizer.from_pretrained(tmp_path / "ext")
    assert reloaded.mask_token_id == 301 and reloaded.encode(russian) == extended.encode(russian)


def test_extend_errors(english_tokenizer, corpora, external_tokenizer):
    with pytest.raises(ValueError, match="yields only"):
        extend_tokenizer(english_tokenizer, [corpora / "en.txt"], 5000, progress=False, num_threads=1)
    with pytest.raises(ValueError, match="only unigram"):
        extend_tokenizer(external_tokenizer, [corpora / "ru.txt"], 10, progress=False, num_threads=1)
    with pytest.raises(ValueError, match="at least 1"):
        extend_tokenizer(english_tokenizer, [corpora / "ru.txt"], 0, progress=False)


# ---------------------------------------------------------------------- CLI
def test_cli_help_has_examples(capsys):
    for action in ("train", "extend"):
        with pytest.raises(SystemExit):
            _cli(["tokenizer", action, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"beit3 tokenizer {action}" in out


def test_cli_train_then_extend(corpora, tmp_path):
    assert _cli(["tokenizer", "train", "--input", str(corpora / "en.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "tok"), "--num-threads", "1"]) == 0
    assert Beit3Tokenizer.from_pretrained(tmp_path / "tok").vocab_size == 302
    assert _cli(["tokenizer", "extend", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpora / "ru.txt"),
                 "--num-new-pieces", "50", "--output", str(tmp_path / "ext"), "--num-threads", "1"]) == 0
    assert Beit3Tokenizer.from_pretrained(tmp_path / "ext").vocab_size == 352
    with pytest.raises(ValueError, match="go together"):
        _cli(["tokenizer", "extend", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpora / "ru.txt"),
              "--num-new-pieces", "5", "--output", str(tmp_path / "x"), "--model", str(tmp_path)])


def test_cli_extend_resizes_the_model_keeping_old_rows(english_tokenizer, corpora, tmp_path):
    from beit3.config import Beit3Config
    from beit3.models import Beit3ForCaptioning, load_any_model

    torch.manual_seed(0)
    model = Beit3ForCaptioning(Beit3Config.from_preset("tiny", vocab_size=english_tokenizer.vocab_size),
                               mask_token_id=english_tokenizer.mask_token_id)
    model.save_pretrained(tmp_path / "model")
    english_tokenizer.save_pretrained(tmp_path / "model")
    Beit3ImageProcessor(32, "vl").save_pretrained(tmp_path / "model")
    assert _cli(["tokenizer", "extend", "--tokenizer", str(tmp_path / "model"), "--input", str(corpora / "ru.txt"),
                 "--num-new-pieces", "40", "--output", str(tmp_path / "tok"), "--num-threads", "1",
                 "--model", str(tmp_path / "model"), "--model-output", str(tmp_path / "resized")]) == 0
    resized = load_any_model(tmp_path / "resized")
    assert resized.config.vocab_size == 342
    old_rows = english_tokenizer.vocab_size
    torch.testing.assert_close(resized.beit3.text_embed.weight[:old_rows], model.beit3.text_embed.weight)
    torch.testing.assert_close(resized.mlm_head.weight[:old_rows], model.mlm_head.weight)
    assert resized.mlm_head.weight.shape[0] == 342
    # the output directory is complete: tokenizer and image pipeline travel with the model
    assert Beit3Tokenizer.from_pretrained(tmp_path / "resized").vocab_size == 342
    assert Beit3ImageProcessor.from_pretrained(tmp_path / "resized").image_size == 32


def test_bpe_keeps_whole_words_where_unigram_keeps_fragments(tmp_path):
    """A tiny closed language (the synthetic world's case): unigram training caps the vocabulary
    below the word count and spells words out; BPE with more pieces keeps every word whole."""
    from beit3.data.synthetic.language import captions
    from beit3.data.synthetic.scene import random_scene
    import random

    rng = random.Random(0)
    lines = [text for _ in range(400) for text in captions(random_scene(rng), rng, 2)]
    corpus = tmp_path / "world.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    words = {word.strip(",.") for line in lines for word in line.split()}
    bpe = train_tokenizer([corpus], 200, progress=False, num_threads=1, model_type="bpe")
    whole = [w for w in words if len(bpe.tokenize(w)) == 1]
    assert len(whole) >= 0.9 * len(words), sorted(words - set(whole))
    assert "▁yellow" in bpe.tokenize("a yellow circle")
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([corpus], 50, progress=False, model_type="wordpiece")


def test_cli_trains_bpe(corpora, tmp_path):
    out = tmp_path / "tok"
    assert _cli(["tokenizer", "train", "--input", str(corpora / "en.txt"), "--vocab-size", "200",
                 "--model-type", "bpe", "--num-threads", "1", "--output", str(out)]) == 0
    proto = spm.SentencePieceProcessor(model_file=str(next(out.glob("*.model"))))
    assert proto.get_piece_size() == 200
