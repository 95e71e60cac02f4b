"""The synthetic world, a tokenizer trained on its texts and a tiny pretrained backbone, made once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# validation index of each task, cut to a few rows (same folder, so image paths still resolve)
VAL_INDEX = {
    "imagenet": "imagenet.val.index.jsonl",
    "vqav2": "vqa.rest_val.jsonl",
    "nlvr2": "nlvr2.dev.index.jsonl",
    "retrieval": "coco_retrieval.val.jsonl",
    "captioning": "coco_captioning.val.jsonl",
}


def write_corpus(index_dir: Path, out: Path) -> Path:
    """Every caption, question and statement of the world's indexes, one a line."""
    lines: list[str] = []
    for path in sorted(index_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if isinstance(row.get("text"), str):
                lines.append(row["text"])
            lines += row.get("references") or []
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from beit3.data.synthetic import generate

    out = tmp_path_factory.mktemp("world")
    generate(out, size="small", seed=0)
    index = out / "index"
    for task, name in VAL_INDEX.items():
        rows = (index / name).read_text().splitlines()
        (index / f"small.{name}").write_text("\n".join(rows[:6]) + "\n")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(world: Path, tmp_path_factory) -> Path:
    from beit3.processing import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    corpus = write_corpus(world / "index", out / "corpus.txt")
    train_tokenizer([corpus], 90, out, progress=False, num_threads=1, character_coverage=1.0)
    return out


@pytest.fixture(scope="session")
def pretrained_dir(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A tiny random backbone saved as a checkpoint folder, with the tokenizer beside it."""
    from beit3.config import Beit3Config
    from beit3.models import Beit3Model
    from beit3.processing import Beit3Tokenizer

    out = tmp_path_factory.mktemp("pretrained")
    Beit3Model(Beit3Config.from_preset("tiny")).save_pretrained(out)
    Beit3Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
