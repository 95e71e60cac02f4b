"""Image loading and the deterministic BEiT-3 image pipelines a model folder needs for inference.

===============  ====================================================  ========================
mode             pipeline                                              mean / std
===============  ====================================================  ========================
``"vl"``         squash-resize to SxS (bicubic)                        0.5 / 0.5
``"imagenet"``   resize short side to int(S / crop_pct), centre crop  ImageNet's
===============  ====================================================  ========================

Training augmentation is not here: it belongs to the data path
(:func:`beit3.data.transforms.train_image_transform`), so a saved processor is the same on
every call. :func:`mode_defaults` holds each mode's settings for both.

Every input kind (PIL image, numpy array, tensor, path, bytes) is first turned into an 8-bit RGB
PIL image, so all of them take the exact PIL code path of the official data loaders.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
CONFIG_FILENAME = "preprocessor_config.json"
# Settings older preprocessor_config.json files hold from when the processor also augmented;
# augmentation now lives in beit3.data.transforms, so loading drops them.
LEGACY_TRAINING_KEYS = frozenset({"train", "randaug", "crop_scale", "random_erasing", "horizontal_flip"})

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes]
Mode = Literal["vl", "imagenet"]


@dataclass(frozen=True)
class ModeDefaults:
    """The official settings of a mode, used when a caller does not choose them.

    Attributes:
        mean, std: normalisation (eval and training).
        crop_scale: area range of the training random resized crop.
        random_erasing: training random erasing probability (the official VL recipe has none).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_scale: tuple[float, float]
    random_erasing: float


_MODE_DEFAULTS: dict[str, ModeDefaults] = {
    "vl": ModeDefaults(IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, (0.5, 1.0), 0.0),
    "imagenet": ModeDefaults(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, (0.08, 1.0), 0.25),
}


def mode_defaults(mode: str) -> ModeDefaults:
    """The defaults of ``mode`` (``"vl"``: VQAv2, NLVR2, captioning, retrieval; ``"imagenet"``:
    classification); the one table both the processor and the training transform read."""
    if mode not in _MODE_DEFAULTS:
        raise ValueError(f"mode must be 'vl' or 'imagenet', got {mode!r}")
    return _MODE_DEFAULTS[mode]


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
    """Turns images into the ``pixel_values`` a BEiT-3 model takes, with the official eval pipelines.

    Deterministic: the same image always gives the same tensor, so this is what a model folder
    saves for inference. Training augmentation is :func:`beit3.data.transforms.train_image_transform`.

    Args:
        image_size: output side S (the model's ``image_size``).
        mode: ``"vl"`` (VQAv2, NLVR2, captioning, retrieval) or ``"imagenet"`` (classification).
        crop_pct: imagenet resizes the short side to ``int(S / crop_pct)`` before the centre
            crop; the official default is 1.0 (no border cut).
        mean, std: normalisation; defaults 0.5/0.5 for vl and ImageNet's for imagenet.
    """

    deterministic = True
    """The same image always gives the same tensor (the training datasets cache it; see
    :func:`beit3.data.transforms.is_deterministic`)."""

    def __init__(
        self,
        image_size: int = 224,
        mode: Mode = "vl",
        *,
        crop_pct: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        defaults = mode_defaults(mode)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.image_size = int(image_size)
        self.mode: Mode = mode
        self.crop_pct = float(crop_pct)
        self.mean = tuple(float(m) for m in (defaults.mean if mean is None else mean))
        self.std = tuple(float(s) for s in (defaults.std if std is None else std))
        self.transform = self._build()

    def _build(self) -> T.Compose:
        size = self.image_size
        bicubic = T.InterpolationMode.BICUBIC
        if self.mode == "vl":
            steps: list[Any] = [T.Resize((size, size), interpolation=bicubic)]
        else:
            steps = [T.Resize(int(size / self.crop_pct), interpolation=bicubic), T.CenterCrop(size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

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
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Beit3ImageProcessor":
        """Build from :meth:`to_dict` output; the training settings of older files are dropped."""
        config = {key: value for key, value in config.items() if key not in LEGACY_TRAINING_KEYS}
        config.pop("image_processor_class", None)
        unknown = set(config) - {"image_size", "mode", "crop_pct", "mean", "std"}
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
