"""A task whose image transform draws no random numbers caches each image's pixels: decoded and
resized once per run, with exactly the tensors the uncached path gives."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from beit3.catalogue import get_task
from beit3.training.config import config_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def make_task(name: str, world: Path, tokenizer: Path, **overrides):
    recipe = yaml.safe_load((CONFIGS / f"tiny_{name}.yaml").read_text())
    recipe["task"]["options"].update(tokenizer=str(tokenizer), **overrides.pop("options", {}))
    recipe["data"].update(root=str(world / "index"), **overrides.pop("data", {}))
    return get_task(name).task_class(config_from_dict(recipe))


def decodes(monkeypatch) -> list[str]:
    import beit3.processing.image as processing_image

    seen: list[str] = []
    real = processing_image._decode
    monkeypatch.setattr(processing_image, "_decode", lambda *a: seen.append(a[1]) or real(*a))
    return seen


@pytest.mark.parametrize("name", ["nlvr2", "captioning"])
def test_deterministic_recipes_cache_pixels_equal_to_the_uncached_ones(name, world, tokenizer_dir, monkeypatch):
    task = make_task(name, world, tokenizer_dir)
    train, val = task.build_datasets(task.cfg)
    assert train.images.pixels is not None and val.images.pixels is not None
    uncached_task = make_task(name, world, tokenizer_dir, data={"image_cache_mb": 0})
    uncached, _ = uncached_task.build_datasets(uncached_task.cfg)
    assert uncached.images.pixels is None  # no cache: the processor transforms every image it is given

    seen = decodes(monkeypatch)
    rows = range(min(len(train), 40))
    for _ in range(2):  # two "epochs"
        for i in rows:
            torch.manual_seed(i)  # captioning masks words at random: the same draws on both sides
            got = train[i]
            torch.manual_seed(i)
            want = uncached[i]
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got), (name, i)
    files = {p for _, row in train.rows[:40] for key in ("image_path", "image2_path") if key in row
             for p in [row[key]]}
    # the cached dataset decoded each file once; the uncached one at every read
    assert len(seen) == len(files) + 2 * sum(1 + ("image2_path" in row) for _, row in train.rows[:40])
    assert train.images.used_bytes == len(train.images) * 3 * 32 * 32 * 4


def test_a_random_recipe_keeps_decoded_images(world, tokenizer_dir):
    task = make_task("nlvr2", world, tokenizer_dir, options={"crop_scale": [0.5, 1.0]})
    train, val = task.build_datasets(task.cfg)
    assert train.images.pixels is None  # random crops: every epoch draws new pixels
    assert val.images.pixels is not None  # evaluation is always deterministic
    task = make_task("vqav2", world, tokenizer_dir, options={"horizontal_flip": True})
    assert task.build_datasets(task.cfg)[0].images.pixels is None
