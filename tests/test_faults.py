"""Every `beit3` command that writes, against a destination it cannot write to (tests/faults.py).

* A read-only output folder: the command fails at once, before any work, with one line
  ``beit3 <command>: error: ...`` naming the folder, and no traceback.
* A full disk (a small tmpfs, as root) for the commands that write big files (``search index``,
  ``data build``): one line saying "no space left", and what was there before is unchanged.

The inputs are tiny and valid, so what fails is the destination and nothing else.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.faults import assert_one_line_error, full_dir, read_only_dir, run_cli, tree_snapshot
from tests.tiny_pipelines import save_model_folder, tiny_tokenizer, write_images

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small valid inputs for every command: images, a corpus, an ImageNet-style root with its index,
    tiny model folders, an official-style checkpoint and a search index."""
    from beit3.data.builders import build_imagenet
    from beit3.tasks.search import ImageIndex

    root = tmp_path_factory.mktemp("inputs")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    images = root / "images"
    write_images(images, 2, size=(24, 24))
    imagenet = root / "imagenet"
    for split in ("train", "val"):
        for number, name in enumerate(("red", "blue")):
            write_images(imagenet / split / name, 2, seed=number, size=(16, 16))
    build_imagenet(imagenet, imagenet / "index")
    found = {
        "images": images,
        "corpus": root / "tokenizer" / "corpus.txt",
        "imagenet": imagenet,
        "captioning": save_model_folder("captioning", tokenizer, root / "captioning"),
        "classification": save_model_folder("classification", tokenizer, root / "classification", num_labels=2),
        "retrieval": save_model_folder("retrieval", tokenizer, root / "retrieval"),
    }
    state = {f"beit3.{k}": v for k, v in _official_names(root)}
    torch.save({"model": state}, root / "backbone.pth")
    found["checkpoint"] = root / "backbone.pth"
    ImageIndex(root / "search.index", model=found["retrieval"]).update([images], progress=False)
    found["index"] = root / "search.index"
    return found


def _official_names(root: Path):
    from beit3.config import Beit3Config
    from beit3.models import Beit3Model
    from tests.models.reference import official_names

    return official_names(Beit3Model(Beit3Config.from_preset("tiny"))).items()


def _command(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    """``beit3 <name>`` writing into the folder ``out``."""
    images, imagenet = inputs["images"], inputs["imagenet"]
    return {
        "convert": ["convert", inputs["checkpoint"], out / "model", "--num-heads", "4"],
        "data synthetic": ["data", "synthetic", "--out", out / "world"],
        "data build": ["data", "build", "imagenet", "--root", imagenet, "--out", out],
        "tokenizer train": ["tokenizer", "train", "--input", inputs["corpus"], "--vocab-size", "40",
                            "--output", out / "tokenizer", "--num-threads", "1"],
        "visual-tokenizer train": ["visual-tokenizer", "train", "--images", images, "--out", out / "vqkd",
                                   "--steps", "1", "--batch-size", "2", "--device", "cpu"],
        "finetune": ["finetune", "--recipe", CONFIGS / "tiny_imagenet.yaml", f"data.root={imagenet / 'index'}",
                     f"train.output_dir={out / 'run'}", "schedule.max_steps=1", "data.batch_size=2"],
        "pretrain": ["pretrain", "--recipe", CONFIGS / "pretrain_tiny.yaml", f"train.output_dir={out / 'run'}",
                     "schedule.max_steps=1"],
        "predict --output": ["predict", "caption", "--model", inputs["captioning"], images, "--max-length", "4",
                             "--num-beams", "1", "--output", out / "captions.json", "--device", "cpu"],
        "evaluate --output": ["evaluate", "--task", "imagenet", "--checkpoint", inputs["classification"],
                              "--index", imagenet / "index" / "imagenet.val.index.jsonl",
                              "--output", out / "eval.json"],
        "search index": ["search", "index", "--model", inputs["retrieval"], "--index", out / "photos.index",
                         images, "--workers", "0", "--no-progress", "--device", "cpu"],
        "search query --output": ["search", "query", "--index", inputs["index"], "--text", "red",
                                  "--output", out / "hits.json", "--device", "cpu"],
    }[name]


# What "the work" is for each command: called before the destination is checked, it fails the test.
MODEL = "beit3.models.base.Beit3PreTrainedModel.__init__"  # building or loading any BEiT-3 model
WORK = {"convert": MODEL, "finetune": MODEL, "pretrain": MODEL, "predict --output": MODEL,
        "evaluate --output": MODEL, "search index": MODEL, "search query --output": MODEL,
        "data synthetic": "beit3.data.commands.generate",
        "tokenizer train": "beit3.processing.tokenizer_training.train_tokenizer",
        "visual-tokenizer train": "beit3.pretraining.vqkd_training.train_visual_tokenizer"}


def _forbid_work(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    def work(*args, **kwargs):
        raise AssertionError(f"beit3 {command} started its work before checking its destination")

    if command == "data build":
        from beit3.data.builders import BUILDERS

        monkeypatch.setitem(BUILDERS, "imagenet", work)
    else:
        monkeypatch.setattr(WORK[command], work)


WRITERS = ["convert", "data synthetic", "data build", "tokenizer train", "visual-tokenizer train", "finetune",
           "pretrain", "predict --output", "evaluate --output", "search index", "search query --output"]


@pytest.mark.parametrize("command", WRITERS)
def test_a_read_only_destination_fails_first_in_one_line(command, inputs, tmp_path, monkeypatch):
    with read_only_dir(tmp_path) as read_only:
        _forbid_work(monkeypatch, command)
        code, _, err = run_cli(_command(command, inputs, read_only))
        assert_one_line_error(code, err, read_only)
        # the check comes before any work: nothing else (progress, training logs) was printed
        assert [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[-1]], err
        assert not any(read_only.iterdir())


def _fill(folder: Path, leave: int = 4096) -> None:
    """Take all the free space of ``folder``'s file system but ``leave`` bytes (one tmpfs page)."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("command", ["search index", "data build"])
def test_a_full_disk_is_one_line_and_leaves_the_previous_output(command, inputs, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(inputs["images"], images)
    with full_dir(tmp_path, size="1m") as full:
        args = _command(command, {**inputs, "images": images}, full)
        code, _, err = run_cli(args)
        assert code == 0, err
        write_images(images / "more", 1, seed=5, size=(24, 24))
        shutil.copy(images / "more" / "0.png", images / "new.png")  # new work for the second run
        _fill(full)
        before = tree_snapshot(full)

        code, _, err = run_cli(args)
        assert_one_line_error(code, err, "no space left", full)
        assert tree_snapshot(full) == before
