"""Shared fixtures: tokenizers trained from the multilingual captions shipped in data/."""
from __future__ import annotations

from pathlib import Path

import pytest

from beit3.processing import Beit3Tokenizer, train_tokenizer

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "captions_multilingual.txt"
# BPE, character_coverage=1.0, identity normalisation, trained with SentencePiece's own file
# API (see data/README.md): a different code path and settings from train_tokenizer.
EXTERNAL_SPM = DATA / "bpe_external.model"


@pytest.fixture(scope="session")
def trained_tokenizer() -> Beit3Tokenizer:
    return train_tokenizer([CORPUS], vocab_size=800, character_coverage=1.0, progress=False, num_threads=1)


@pytest.fixture(scope="session")
def external_tokenizer() -> Beit3Tokenizer:
    return Beit3Tokenizer(EXTERNAL_SPM)
