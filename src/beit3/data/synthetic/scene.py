"""Scenes of the synthetic world: a few coloured shapes on a textured background, and their rendering.

Objects sit in distinct cells of a 3 x 3 grid (jittered inside the cell), so they never overlap and
"left of" / "above" are unambiguous, while the image still varies continuously. Small shapes at 64
pixels are a few pixels wide, which keeps recognition learnable but not trivial.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 45, 45), "green": (50, 180, 70), "blue": (55, 90, 225),
    "yellow": (235, 215, 50), "purple": (160, 70, 205), "white": (240, 240, 240),
}
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
GRID = 3
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
_RADIUS = {"small": 0.25, "large": 0.42}  # fraction of a cell


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is and where (grid cell plus a pixel offset inside the cell)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float
    dy: float


@dataclass(frozen=True)
class Scene:
    """A whole image: background texture and its objects."""

    background: str
    tone: int
    objects: tuple[SceneObject, ...]
    texture_seed: int


def random_scene(rng: random.Random, *, min_objects: int = 1, max_objects: int = 4,
                 main: tuple[str, str] | None = None, sizes: tuple[str, ...] = SIZES) -> Scene:
    """Draw a scene; ``main=(colour, shape)`` forces one large object of that kind and makes the others
    small; ``sizes`` are the sizes the other objects are drawn from."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    objects = []
    for number, (row, col) in enumerate(cells):
        if main is not None and number == 0:
            colour, shape, size = main[0], main[1], "large"
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            size = "small" if main is not None else rng.choice(sizes)
        objects.append(SceneObject(shape, colour, size, row, col, rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)))
    return Scene(rng.choice(BACKGROUNDS), rng.randint(50, 120), tuple(objects), rng.getrandbits(32))


@functools.lru_cache(maxsize=16)
def _pattern(background: str, size: int) -> np.ndarray:
    """The background's texture, 0 or 1 per pixel (read-only; the same for every scene of a size)."""
    ys, xs = np.mgrid[0:size, 0:size]
    period = max(4, size // 8)
    if background == "striped":
        pattern = ((xs + ys) // (period // 2) % 2).astype(np.float32)
    elif background == "checkered":
        pattern = ((xs // period + ys // period) % 2).astype(np.float32)
    elif background == "dotted":
        pattern = (((xs % period) - period / 2) ** 2 + ((ys % period) - period / 2) ** 2 < (period / 4) ** 2)
        pattern = pattern.astype(np.float32)
    else:
        pattern = np.zeros((size, size), np.float32)
    pattern = 25.0 * pattern[..., None]
    pattern.flags.writeable = False
    return pattern


def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    tint = rng.integers(-20, 21, size=3)
    base = np.clip(scene.tone + tint, 0, 255).astype(np.float32)
    image = base[None, None, :] + _pattern(scene.background, size) + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def polygon(obj: SceneObject, size: int) -> list[tuple[float, float]]:
    """Outline of an object in pixel coordinates; also its instance segmentation."""
    cell = size / GRID
    cx, cy = (obj.col + 0.5 + obj.dx) * cell, (obj.row + 0.5 + obj.dy) * cell
    r = _RADIUS[obj.size] * cell
    if obj.shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24)) for k in range(24)]
    if obj.shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    image = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(image)
    jitter = random.Random(scene.texture_seed)
    for obj in scene.objects:
        colour = tuple(max(0, min(255, c + jitter.randint(-15, 15))) for c in COLOURS[obj.colour])
        draw.polygon(polygon(obj, size), fill=colour)
    return image


def instance_masks(scene: Scene, size: int = 64) -> list[np.ndarray]:
    """One boolean (size, size) mask per object, in object order."""
    masks = []
    for obj in scene.objects:
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon(polygon(obj, size), fill=1)
        masks.append(np.asarray(mask, dtype=bool))
    return masks
