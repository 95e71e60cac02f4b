"""Data throughput against model throughput on a folder of large PNGs: what "decode once" buys.

    python benchmarks/large_png_decode.py [--images 48] [--side 2048] [--out result.json]

Writes ``--images`` photo-like PNGs (smooth gradients plus noise, ``--side`` x 3/4 ``--side`` px) in
ImageNet's class-folder layout, indexes them with ``beit3 data build imagenet``, and reads every
training sample of the ``classification`` task (``configs/small_classification.yaml`` at 32 px)
for two epochs, in one process (``num_workers: 0``, as for small data on a few cores), with:

* ``data.image_cache_mb=0``: every epoch decodes and resizes every PNG again (before);
* the default cache (1 GiB): the second epoch reads decoded images from memory;
* the cache and ``data.image_max_side=256``: the images are also shrunk as they are read.

Beside them, the tiny model's training step (forward, backward, AdamW) in samples/s on the same
32 px inputs. Prints one JSON record.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3.cli import main as cli
from beit3.training import build_task, load_config

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "small_classification.yaml"


def write_pngs(root: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    height = side * 3 // 4
    ys, xs = np.mgrid[0:height, 0:side].astype(np.float32)
    for n in range(count):
        split = "val" if n % 8 == 0 else "train"
        folder = root / split / f"class_{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xs / side) * 255, (ys / height) * 255, ((xs + ys) % 256)], axis=-1)
        pixels = np.clip(base * (0.5 + 0.5 * rng.random()) + rng.normal(0, 12, base.shape), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n:04d}.png", compress_level=6)


def epoch_rates(index: Path, out: Path, overrides: list[str], epochs: int = 2) -> list[float]:
    cfg = load_config(RECIPE, [f"data.root={index}", f"train.output_dir={out}", "task.options.num_classes=2",
                               *overrides])
    train, _ = build_task(cfg).build_datasets(cfg)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(len(train)):
            train[i]
        rates.append(len(train) / (time.perf_counter() - start))
    return rates


def model_rate(index: Path, out: Path, batch: int = 64, steps: int = 10) -> float:
    cfg = load_config(RECIPE, [f"data.root={index}", f"train.output_dir={out}", "task.options.num_classes=2"])
    model = build_task(cfg).build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 2, (batch,))
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--out", help="also write the record to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_pngs(root / "raw", args.images, args.side)
        assert cli(["data", "build", "imagenet", "--root", str(root / "raw"), "--out", str(root / "index")]) == 0
        mb = sum(p.stat().st_size for p in (root / "raw").rglob("*.png")) / 2**20
        record: dict = {"images": args.images, "size": f"{args.side}x{args.side * 3 // 4}", "png_mb": round(mb, 1)}
        for name, overrides in (("no_cache", ["data.image_cache_mb=0"]), ("cache", []),
                                ("cache_max_side_256", ["data.image_max_side=256"])):
            rates = epoch_rates(root / "index", root / "run", overrides)
            record[f"{name}_samples_per_s"] = [round(r, 1) for r in rates]
        record["model_train_samples_per_s"] = round(model_rate(root / "index", root / "run"), 1)
        record["epoch2_cache_over_no_cache"] = round(record["cache_samples_per_s"][1]
                                                     / record["no_cache_samples_per_s"][1], 1)
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
