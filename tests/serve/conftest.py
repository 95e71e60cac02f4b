"""A tiny world for the server tests: a tiny model of every task, a folder of shape pictures with a
symlink pointing out of it, and an index of that folder built with the retrieval model."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw


pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install 'beit3[serve]'")
pytest.importorskip("python_multipart", reason="the serve tests need python-multipart")

from tests.tiny_pipelines import save_model_folder, tiny_tokenizer  # noqa: E402

COLOURS = {"red": (220, 50, 47), "blue": (38, 110, 210), "green": (60, 170, 80), "orange": (240, 150, 30),
           "purple": (140, 80, 190), "teal": (30, 160, 160)}
CLASS_NAMES = ["circle", "square", "triangle", "cat"]
SECRET = b"outside the index: must never be served\n"


def shape_picture(colour: tuple[int, int, int], shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 243, 238))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, size // 6), (size * 5 // 6, size * 5 // 6), (size // 6, size * 5 // 6)], fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def build_world(root: Path) -> dict:
    """Model folders (one per task), a photos folder, an index of it; returns their paths."""
    from beit3.tasks.search import ImageIndex

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root / "tokenizer")
    models = {kind: save_model_folder(kind, tokenizer, root / kind)
              for kind in ("captioning", "vqa", "classification", "nlvr2", "zero-shot")}
    (models["classification"] / "labels.txt").write_text("".join(name + "\n" for name in CLASS_NAMES))
    photos = root / "photos"
    photos.mkdir()
    shapes = ("circle", "square", "triangle")
    for number, (name, colour) in enumerate(COLOURS.items()):
        shape_picture(colour, shapes[number % 3]).save(photos / f"{name}_{shapes[number % 3]}.png")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    shape_picture((0, 0, 0), "square").save(outside / "elsewhere.png")
    os.symlink(outside / "elsewhere.png", photos / "zz_link.png")  # inside the folder, pointing out of it
    index = ImageIndex(root / "photos.index", model=models["zero-shot"])
    index.update([photos], progress=False)
    return {"root": root, "models": models, "photos": photos, "index": root / "photos.index", "outside": outside}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def picture() -> bytes:
    return png_bytes(shape_picture(COLOURS["red"], "circle", 64))
