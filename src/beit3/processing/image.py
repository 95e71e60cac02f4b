"""Image loading and the official BEiT-3 per-task image pipelines.

===============  ===========================================  ==================================
mode             eval                                         train
===============  ===========================================  ==================================
``"vl"``         squash-resize to SxS (bicubic), mean=std=0.5  random resized crop scale (0.5, 1),
                                                              flip, BLIP RandAugment (VQAv2,
                                                              captioning)
``"imagenet"``   resize short side to int(S / crop_pct),      random resized crop scale
                 centre crop S, ImageNet mean/std              (0.08, 1), flip, timm RandAugment,
                                                              random erasing p=0.25
===============  ===========================================  ==================================

Every input kind (PIL image, numpy array, tensor, path, bytes) is first turned into an 8-bit RGB
PIL image, so all of them take the exact PIL code path of the official data loaders.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps, UnidentifiedImageError

from beit3.processing.augment import RandomAugment

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
CONFIG_FILENAME = "preprocessor_config.json"

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes]
Mode = Literal["vl", "imagenet"]

# Task -> (mode, RandAugment in the official training recipe). The official docs pass --randaug
# for VQAv2 and captioning only.
TASKS: dict[str, tuple[Mode, bool]] = {
    "vqav2": ("vl", True),
    "captioning": ("vl", True),
    "nlvr2": ("vl", False),
    "retrieval": ("vl", False),
    "classification": ("imagenet", True),
    "imagenet": ("imagenet", True),
}


# ---------------------------------------------------------------------- loading
def load_image(image: ImageInput) -> Image.Image:
    """Turn any supported input into an RGB PIL image with its EXIF orientation applied.

    * paths and bytes are decoded with PIL; unreadable data raises ``ValueError`` naming the file;
    * numpy arrays are ``(H, W)``, ``(H, W, 1|3|4)``, uint8 or float in [0, 1];
    * tensors are ``(H, W)`` or ``(1|3|4, H, W)``, uint8 or float in [0, 1].

    Grayscale, palette, CMYK and 16-bit images become RGB; transparent images are composited onto
    white (the usual background of web images), not onto black as a plain ``convert("RGB")`` does.
    Tiny images (even 1x1) are valid: the pipelines resize them up.
    """
    if isinstance(image, Image.Image):
        img = image
        img.load()
    elif isinstance(image, (str, os.PathLike)):
        img = _open(Path(image))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = _decode(io.BytesIO(bytes(image)), "<bytes>", len(image))
    elif isinstance(image, np.ndarray):
        img = _from_array(image, "numpy array")
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        img = _from_array(tensor.numpy(), "tensor")
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL image, "
                        "numpy array, tensor, file path or bytes")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has no pixels (size {img.width}x{img.height})")
    return _to_rgb(ImageOps.exif_transpose(img))


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: '{path}'")
    with path.open("rb") as handle:
        return _decode(handle, f"'{path}'", path.stat().st_size)


def _decode(stream: io.IOBase, source: str, size: int) -> Image.Image:
    if size == 0:
        raise ValueError(f"cannot read image {source}: it is empty (0 bytes)")
    try:
        img = Image.open(stream)
        img.load()  # decode now, while the file is open, so truncation is reported here
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {source}: not an image format PIL can decode") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {source}: {err}") from None
    return img


def _from_array(array: np.ndarray, kind: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"{kind} image must be (H, W) or (H, W, 1|3|4) (tensors (C, H, W)), "
                         f"got shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"float {kind} images must hold values in [0, 1], got "
                             f"[{array.min():.3g}, {array.max():.3g}]")
        array = np.rint(array * 255.0)
    elif array.dtype != np.uint8:
        raise ValueError(f"{kind} images must be uint8 or float in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits instead of clipping
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------- processor
class Beit3ImageProcessor:
    """Turns images into the ``pixel_values`` a BEiT-3 model takes, with the official pipelines.

    Args:
        image_size: output side S (the model's ``image_size``).
        mode: ``"vl"`` (VQAv2, NLVR2, captioning, retrieval) or ``"imagenet"`` (classification).
        train: use the training augmentation instead of the deterministic eval pipeline.
        crop_pct: imagenet eval resizes the short side to ``int(S / crop_pct)`` before the centre
            crop; the official default is 1.0 (no border cut).
        randaug: apply RandAugment when training (the recipe of ``mode``).
        crop_scale: area range of the training random resized crop; defaults (0.5, 1) for vl and
            (0.08, 1) for imagenet.
        random_erasing: probability of random erasing when training; defaults 0.25 for imagenet
            and 0 for vl (the official VL recipe has none).
        mean, std: normalisation; defaults 0.5/0.5 for vl and ImageNet's for imagenet.
        horizontal_flip: random flips when training (official); turn off when labels say "left"
            or "right", as the synthetic world's questions and captions do.
    """

    def __init__(
        self,
        image_size: int = 224,
        mode: Mode = "vl",
        train: bool = False,
        *,
        crop_pct: float = 1.0,
        randaug: bool = True,
        crop_scale: Sequence[float] | None = None,
        random_erasing: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        horizontal_flip: bool = True,
    ) -> None:
        if mode not in ("vl", "imagenet"):
            raise ValueError(f"mode must be 'vl' or 'imagenet', got {mode!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        vl = mode == "vl"
        self.image_size = int(image_size)
        self.mode: Mode = mode
        self.train = bool(train)
        self.crop_pct = float(crop_pct)
        self.randaug = bool(randaug)
        self.crop_scale = tuple(float(s) for s in (crop_scale or ((0.5, 1.0) if vl else (0.08, 1.0))))
        self.random_erasing = float((0.0 if vl else 0.25) if random_erasing is None else random_erasing)
        self.mean = tuple(float(m) for m in (mean or (IMAGENET_INCEPTION_MEAN if vl else IMAGENET_DEFAULT_MEAN)))
        self.std = tuple(float(s) for s in (std or (IMAGENET_INCEPTION_STD if vl else IMAGENET_DEFAULT_STD)))
        self.horizontal_flip = bool(horizontal_flip)
        self.transform = self._build()

    @classmethod
    def for_task(cls, task: str, image_size: int, train: bool = False) -> "Beit3ImageProcessor":
        """The official pipeline of ``task`` (``vqav2``, ``nlvr2``, ``captioning``, ``retrieval``,
        ``classification``/``imagenet``)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
        mode, randaug = TASKS[task]
        return cls(image_size, mode, train, randaug=randaug)

    def _build(self) -> T.Compose:
        size = self.image_size
        bicubic = T.InterpolationMode.BICUBIC
        steps: list[Any]
        if self.train:
            steps = [T.RandomResizedCrop(size, scale=self.crop_scale, interpolation=bicubic)]
            steps += [T.RandomHorizontalFlip()] if self.horizontal_flip else []
            if self.randaug:
                steps.append(RandomAugment.blip() if self.mode == "vl"
                             else RandomAugment.timm_increasing(self.mean))
        elif self.mode == "vl":
            steps = [T.Resize((size, size), interpolation=bicubic)]
        else:
            steps = [T.Resize(int(size / self.crop_pct), interpolation=bicubic), T.CenterCrop(size)]
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if self.train and self.random_erasing > 0:
            # value="random" fills with per-pixel normal noise: timm's mode="pixel".
            steps.append(T.RandomErasing(p=self.random_erasing, scale=(0.02, 1 / 3),
                                         ratio=(0.3, 1 / 0.3), value="random"))
        return T.Compose(steps)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image -> ``(3, S, S)`` float tensor."""
        return self.transform(load_image(image))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """One image or a batch -> ``{"pixel_values": (B, 3, S, S)}``.

        A list is a batch; so is a 4-D array ``(B, H, W, C)`` or tensor ``(B, C, H, W)``.
        """
        if isinstance(images, (list, tuple)):
            batch = list(images)
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            batch = list(images)
        else:
            batch = [images]
        if not batch:
            raise ValueError("no images given")
        return {"pixel_values": torch.stack([self.preprocess(image) for image in batch])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_class": type(self).__name__,
            "image_size": self.image_size,
            "mode": self.mode,
            "train": self.train,
            "crop_pct": self.crop_pct,
            "randaug": self.randaug,
            "crop_scale": list(self.crop_scale),
            "random_erasing": self.random_erasing,
            "mean": list(self.mean),
            "std": list(self.std),
            "horizontal_flip": self.horizontal_flip,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Beit3ImageProcessor":
        config = dict(config)
        config.pop("image_processor_class", None)
        known = {"image_size", "mode", "train", "crop_pct", "randaug", "crop_scale",
                 "random_erasing", "mean", "std", "horizontal_flip"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown image processor settings {sorted(unknown)}")
        return cls(**config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``save_directory``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Beit3ImageProcessor":
        """Load from a directory holding ``preprocessor_config.json`` (or that JSON file itself)."""
        path = Path(path)
        file = path / CONFIG_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no image processor at '{path}': expected {CONFIG_FILENAME} "
                                    "or a directory holding it")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"'{file}' is not valid JSON: {err}") from None
        return cls.from_dict(config)
