"""RandAugment as the two official BEiT-3 recipes use it, built on torchvision's functional ops.

* Vision-language tasks (VQAv2, captioning) use BLIP's ``RandomAugment(2, 7)``: ten ops, fixed
  magnitude 7/10, each op applied with probability 0.5, grey (128) fill, absolute 7-pixel
  translations, shears about the top-left corner.
* ImageNet uses timm's ``rand-m9-mstd0.5-inc1``: the "increasing" op set, magnitude drawn from
  N(9, 0.5) per op and clipped to [0, 10], probability 0.5, fill with the mean pixel, bicubic
  resampling for geometric ops, translations relative to the image size.

torchvision's own ``RandAugment`` differs from both (op set, always applies each op, magnitude
scale), so the two recipes are reproduced here op by op. Randomness comes from torch's global
generator, so ``torch.manual_seed`` (and DataLoader worker seeding) make runs repeatable.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

MAX_LEVEL = 10.0

# An op maps (image, level in [0, 1], augmenter) to an image; the augmenter supplies fill and
# interpolation so one op table serves both recipes.
Op = Callable[[Image.Image, float, "RandomAugment"], Image.Image]


def _random_sign() -> float:
    return -1.0 if torch.rand(()) < 0.5 else 1.0


def _shear(img: Image.Image, factor: float, aug: "RandomAugment", axis: int) -> Image.Image:
    # Both references shear about the origin (top-left), not the centre: center=[0, 0].
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(factor))
    return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                    interpolation=aug.interpolation, fill=list(aug.fill), center=[0, 0])


def _translate(img: Image.Image, pixels: float, aug: "RandomAugment", axis: int) -> Image.Image:
    offset = [0.0, 0.0]
    offset[axis] = pixels
    return F.affine(img, angle=0.0, translate=offset, scale=1.0, shear=[0.0, 0.0],
                    interpolation=aug.interpolation, fill=list(aug.fill))


def _rotate(img: Image.Image, level: float, aug: "RandomAugment") -> Image.Image:
    return F.rotate(img, _random_sign() * level * 30.0, interpolation=aug.interpolation,
                    fill=list(aug.fill))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    # Keeping 0 bits (magnitude 10) blacks the image out, as it did in the Pillow timm was built
    # on; current Pillow refuses bits=0.
    return Image.new(img.mode, img.size) if bits == 0 else F.posterize(img, bits)


def _solarize_add(img: Image.Image, level: float, aug: "RandomAugment") -> Image.Image:
    add = int(level * 110)
    lut = [min(255, v + add) if v < 128 else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


# BLIP (official VL recipe): enhance factor = level * 1.8 + 0.1, shear 0.3, translate 10 px.
BLIP_OPS: dict[str, Op] = {
    "Identity": lambda img, level, aug: img,
    "AutoContrast": lambda img, level, aug: F.autocontrast(img),
    "Equalize": lambda img, level, aug: F.equalize(img),
    "Brightness": lambda img, level, aug: F.adjust_brightness(img, level * 1.8 + 0.1),
    "Sharpness": lambda img, level, aug: F.adjust_sharpness(img, level * 1.8 + 0.1),
    "ShearX": lambda img, level, aug: _shear(img, _random_sign() * level * 0.3, aug, 0),
    "ShearY": lambda img, level, aug: _shear(img, _random_sign() * level * 0.3, aug, 1),
    "TranslateX": lambda img, level, aug: _translate(img, _random_sign() * level * 10.0, aug, 0),
    "TranslateY": lambda img, level, aug: _translate(img, _random_sign() * level * 10.0, aug, 1),
    "Rotate": _rotate,
}

# timm "increasing" set: a higher level is always a stronger distortion.
TIMM_INCREASING_OPS: dict[str, Op] = {
    "AutoContrast": lambda img, level, aug: F.autocontrast(img),
    "Equalize": lambda img, level, aug: F.equalize(img),
    "Invert": lambda img, level, aug: F.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": lambda img, level, aug: _posterize(img, 4 - int(level * 4)),
    "SolarizeIncreasing": lambda img, level, aug: F.solarize(img, 256 - int(level * 256)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda img, level, aug: F.adjust_saturation(img, 1.0 + _random_sign() * level * 0.9),
    "ContrastIncreasing": lambda img, level, aug: F.adjust_contrast(img, 1.0 + _random_sign() * level * 0.9),
    "BrightnessIncreasing": lambda img, level, aug: F.adjust_brightness(img, 1.0 + _random_sign() * level * 0.9),
    "SharpnessIncreasing": lambda img, level, aug: F.adjust_sharpness(img, 1.0 + _random_sign() * level * 0.9),
    "ShearX": lambda img, level, aug: _shear(img, _random_sign() * level * 0.3, aug, 0),
    "ShearY": lambda img, level, aug: _shear(img, _random_sign() * level * 0.3, aug, 1),
    "TranslateXRel": lambda img, level, aug: _translate(img, _random_sign() * level * 0.45 * img.width, aug, 0),
    "TranslateYRel": lambda img, level, aug: _translate(img, _random_sign() * level * 0.45 * img.height, aug, 1),
}


class RandomAugment(torch.nn.Module):
    """Apply ``num_ops`` ops drawn with replacement, each with probability ``prob``.

    Args:
        ops: name -> op table (:data:`BLIP_OPS` or :data:`TIMM_INCREASING_OPS`).
        num_ops: ops drawn per image.
        magnitude: strength on a 0-10 scale.
        magnitude_std: if > 0, each op draws its magnitude from N(magnitude, std), clipped to 0-10.
        prob: probability that a drawn op is applied.
        fill: RGB value for pixels moved in from outside by geometric ops.
        interpolation: resampling for geometric ops.
    """

    def __init__(self, ops: dict[str, Op], num_ops: int = 2, magnitude: float = 7.0,
                 magnitude_std: float = 0.0, prob: float = 0.5,
                 fill: Sequence[int] = (128, 128, 128),
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        super().__init__()
        self.ops = ops
        self.names = list(ops)
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.prob = prob
        self.fill = tuple(fill)
        self.interpolation = interpolation

    @classmethod
    def blip(cls, num_ops: int = 2, magnitude: float = 7.0) -> "RandomAugment":
        """The official VL recipe (``RandomAugment(2, 7, augs=[...])`` from BLIP)."""
        return cls(BLIP_OPS, num_ops=num_ops, magnitude=magnitude)

    @classmethod
    def timm_increasing(cls, mean: Sequence[float], num_ops: int = 2, magnitude: float = 9.0,
                        magnitude_std: float = 0.5) -> "RandomAugment":
        """The official ImageNet recipe (timm ``rand-m9-mstd0.5-inc1``), filling with ``mean``."""
        fill = tuple(min(255, round(255 * m)) for m in mean)
        return cls(TIMM_INCREASING_OPS, num_ops=num_ops, magnitude=magnitude,
                   magnitude_std=magnitude_std, fill=fill, interpolation=InterpolationMode.BICUBIC)

    def forward(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.names[int(torch.randint(len(self.names), ()))]
            if torch.rand(()) >= self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = float(torch.normal(torch.tensor(magnitude), self.magnitude_std))
            level = min(MAX_LEVEL, max(0.0, magnitude)) / MAX_LEVEL
            img = self.ops[name](img, level, self)
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ops={self.names}, num_ops={self.num_ops}, "
                f"magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, prob={self.prob})")
