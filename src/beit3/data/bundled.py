"""Small real datasets that ship inside registry packages, written in the official raw layouts.

Nothing is downloaded: scikit-learn's wheel carries the UCI handwritten digits (1,797 scans of
digits 0-9 by 43 writers, 8x8 pixels, 16 grey levels). :func:`write_digits` writes them as an
ImageNet-style class-folder tree (``train/<class>/*.png``, ``val/<class>/*.png``) that
``beit3 data build imagenet`` turns into an index, so the small-data recipes are checked on real
images rather than on the synthetic world (``pip install scikit-learn``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) uint8 in 0-255, labels (N,)) of scikit-learn's bundled digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the bundled digits need scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0-16 grey levels -> 0-255
    return images, digits.target.astype(np.int64)


def digits_split(val_fraction: float = 0.25, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A stratified, seeded train / val split of the digits: ``{"train": (x, y), "val": (x, y)}``."""
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    val_index: list[int] = []
    for label in range(10):
        members = np.flatnonzero(labels == label)
        val_index += rng.permutation(members)[: round(len(members) * val_fraction)].tolist()
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_index] = True
    return {"train": (images[~is_val], labels[~is_val]), "val": (images[is_val], labels[is_val])}


def write_digits(out: str | Path, *, val_fraction: float = 0.25, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Write the digits as ``out/{train,val}/<digit name>/<n>.png`` (upscaled to ``size`` px, nearest).

    Returns the counts per split. The split is the one of :func:`digits_split`, so a baseline on the
    raw pixels can be computed on exactly the images the recipe trains and validates on.
    """
    from PIL import Image

    out = Path(out)
    counts = {}
    for split, (images, labels) in digits_split(val_fraction, seed).items():
        for number, (image, label) in enumerate(zip(images, labels)):
            folder = out / split / f"{int(label)}_{DIGIT_NAMES[int(label)]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").resize((size, size), Image.NEAREST).save(folder / f"{number:05d}.png")
        counts[split] = len(labels)
    return counts


def ridge_baseline(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], *,
                   alpha: float = 1.0) -> float:
    """Top-1 % of a ridge classifier (one-vs-all least squares on standardised raw pixels, with a
    bias) trained on ``train`` and scored on ``val``: the floor a small-data recipe must reach."""
    x_train, y_train = train[0].reshape(len(train[0]), -1).astype(np.float64), train[1]
    x_val, y_val = val[0].reshape(len(val[0]), -1).astype(np.float64), val[1]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    x_train = np.hstack([x_train, np.ones((len(x_train), 1))])
    x_val = np.hstack([x_val, np.ones((len(x_val), 1))])
    targets = np.where(np.eye(10)[y_train] > 0, 1.0, -1.0)
    weights = np.linalg.solve(x_train.T @ x_train + alpha * np.eye(x_train.shape[1]), x_train.T @ targets)
    return float(100 * np.mean((x_val @ weights).argmax(1) == y_val))


DIGIT_GRID_TEMPLATES = (
    "{a} {b} {c} {d}",
    "the digits {a} {b} {c} and {d}",
    "{a} and {b} on top, {c} and {d} below",
    "four handwritten digits: {a}, {b}, {c}, {d}",
    "a grid of the numbers {a} {b} {c} {d} written by hand",
)
"""The five reference captions of a digit grid: its digits in reading order, in five wordings."""


def write_digit_captions(out: str | Path, *, images: dict[str, int] | None = None, seed: int = 0,
                         size: int = 32) -> dict[str, int]:
    """Image-caption pairs of real handwriting in COCO's Karpathy layout, for retrieval and captioning.

    Each image is a 2x2 grid of four scans of the bundled digits (upscaled to ``size`` px, nearest);
    its five captions name the digits in reading order, in the wordings of
    :data:`DIGIT_GRID_TEMPLATES`. Training images are drawn from the training scans of
    :func:`digits_split`, validation and test images from its validation scans, so no scan of a
    validation image was seen in training. Writes ``out/dataset_coco.json`` and the images under
    ``out/train2014`` / ``out/val2014``, which ``beit3 data build coco_retrieval`` and
    ``coco_captioning`` index. ``images``: how many per split (default train 1,500, val 200, test 200).
    Returns those counts.
    """
    from PIL import Image

    out = Path(out)
    counts = dict(images or {"train": 1500, "val": 200, "test": 200})
    split = digits_split(seed=seed)
    rng = np.random.default_rng(seed + 1)
    entries: list[dict[str, Any]] = []
    for name, count in counts.items():
        scans, labels = split["train" if name == "train" else "val"]
        folder = "train2014" if name == "train" else "val2014"
        (out / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            picked = rng.choice(len(labels), size=4, replace=False)
            grid = np.block([[scans[picked[0]], scans[picked[1]]], [scans[picked[2]], scans[picked[3]]]])
            filename = f"digits_{folder}_{len(entries):06d}.png"
            Image.fromarray(grid, mode="L").resize((size, size), Image.NEAREST).save(out / folder / filename)
            words = dict(zip("abcd", (DIGIT_NAMES[int(labels[i])] for i in picked)))
            texts = [template.format(**words) for template in DIGIT_GRID_TEMPLATES]
            entries.append({"filepath": folder, "filename": filename, "imgid": len(entries), "split": name,
                            "cocoid": len(entries) + 1,
                            "sentences": [{"raw": t, "tokens": t.replace(",", "").replace(":", "").split(),
                                           "imgid": len(entries), "sentid": 5 * len(entries) + k}
                                          for k, t in enumerate(texts)]})
    import json

    (out / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}), encoding="utf-8")
    return counts
