"""Tiny task models saved as model folders with a tokenizer, for the inference tests."""
from __future__ import annotations

import random
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3.config import Beit3Config
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from beit3.processing import Beit3Tokenizer, train_tokenizer

WORDS = ("a photo picture image of the red blue green circle square triangle cat dog is there what colour "
         "left right two shows small large close-up drawing rendering good bright dark blurry cropped an").split()


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_tokenizer(folder: Path) -> Beit3Tokenizer:
    """A 40-piece SentencePiece model trained in ~10 ms on sentences made of WORDS."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + rng.choice(".?") for _ in range(300)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n")
    return train_tokenizer([folder / "corpus.txt"], 40, progress=False, num_threads=1, character_coverage=1.0)


def tiny_model(kind: str, tokenizer: Beit3Tokenizer, num_labels: int = 4):
    config = Beit3Config.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    if kind == "captioning":
        return Beit3ForCaptioning(config, mask_token_id=tokenizer.mask_token_id)
    if kind == "vqa":
        return Beit3ForVisualQuestionAnswering(config, num_labels=num_labels)
    if kind == "classification":
        return Beit3ForImageClassification(config, num_labels=num_labels)
    if kind == "nlvr2":
        return Beit3ForVisualReasoning(config)
    return Beit3ForImageTextRetrieval(config)


def save_model_folder(kind: str, tokenizer: Beit3Tokenizer, folder: Path, num_labels: int = 4) -> Path:
    """save_pretrained + the tokenizer beside it, as a user would ship a fine-tuned model."""
    model = tiny_model(kind, tokenizer, num_labels)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_model_folders(tokenizer: Beit3Tokenizer, root: Path) -> dict[str, Path]:
    """A saved tiny model folder for every pipeline kind, seeded."""
    torch.manual_seed(0)
    return {kind: save_model_folder(kind, tokenizer, root / kind)
            for kind in ("captioning", "vqa", "classification", "nlvr2", "zero-shot")}


def write_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (40, 50)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def huge_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit side x side PNG of zeros, written row by row (~50 KB on disk, ~0.2 s),
    so the test never holds the decoded image in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def bad_files(folder: Path) -> dict[str, Path]:
    """A corrupt PNG, a 20000x20000 PNG, an empty file and a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "corrupt.png"
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:60])  # header kept, image data cut
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    return {"corrupt": good, "huge": huge_png(folder / "huge.png"), "empty": folder / "empty.jpg",
            "text": folder / "notes.txt"}
