"""Training-time randomness of the official BEiT-3 recipes: image augmentation and caption masking.

Both run in the data path (data-loader workers), never in the saved processor, which stays
deterministic for inference (:class:`beit3.processing.Beit3ImageProcessor`).

===============  ==========================================================================
mode             training image augmentation
===============  ==========================================================================
``"vl"``         random resized crop scale (0.5, 1), flip, BLIP RandAugment (the official
                 recipe turns it on for VQAv2 and captioning only)
``"imagenet"``   random resized crop scale (0.08, 1), flip, timm RandAugment, random
                 erasing p=0.25
===============  ==========================================================================

Randomness comes from torch's global generator, so ``torch.manual_seed`` (and DataLoader worker
seeding) make runs repeatable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from beit3.processing.augment import RandomAugment
from beit3.processing.image import ImageInput, Mode, load_image, mode_defaults

DEFAULT_CAPTIONING_MASK_PROB = 0.6  # the official --captioning_mask_prob default (docs use 0.7)


# ---------------------------------------------------------------------- images
class WholeViewResize:
    """What ``RandomResizedCrop(size, scale=(1, 1))`` gives, without its random draws: at scale 1
    nearly every one of torchvision's ten tries is rejected, and its fallback -- the centred crop of
    the whole image to an aspect ratio within [3/4, 4/3] -- is what comes out (the same pixels in
    all but rare rounding cases, a crop one pixel smaller). Bicubic, as the official recipes."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        crop_w, crop_h = width, height
        if width / height < 3 / 4:
            crop_h = int(round(width / (3 / 4)))
        elif width / height > 4 / 3:
            crop_w = int(round(height * (4 / 3)))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return TF.resized_crop(image, top, left, crop_h, crop_w, [self.size, self.size],
                               T.InterpolationMode.BICUBIC)


@dataclass(frozen=True)
class TrainImageTransform:
    """One image -> ``(3, S, S)`` with the official training augmentation of ``mode``.

    Build it with :func:`train_image_transform`, which fills in the mode's defaults. The fields
    are the whole state: pickling keeps only them and rebuilds the pipeline, since RandAugment's
    op tables are lambdas that cannot be pickled (spawned data-loader workers need this).
    """

    image_size: int
    mode: Mode
    crop_scale: tuple[float, float]
    horizontal_flip: bool
    randaug: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_erasing: float

    def __post_init__(self) -> None:
        mode_defaults(self.mode)  # rejects an unknown mode
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        object.__setattr__(self, "_pipeline", self._build())

    def _build(self) -> T.Compose:
        # The order of the steps is the order in which they draw random numbers.
        if self.crop_scale[0] >= 1.0:  # the whole image: no random tries to draw
            steps: list[Any] = [WholeViewResize(self.image_size)]
        else:
            steps = [T.RandomResizedCrop(self.image_size, scale=self.crop_scale,
                                         interpolation=T.InterpolationMode.BICUBIC)]
        if self.horizontal_flip:
            steps.append(T.RandomHorizontalFlip())
        if self.randaug:
            steps.append(RandomAugment.blip() if self.mode == "vl" else RandomAugment.timm_increasing(self.mean))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if self.random_erasing > 0:
            # value="random" fills with per-pixel normal noise: timm's mode="pixel".
            steps.append(T.RandomErasing(p=self.random_erasing, scale=(0.02, 1 / 3),
                                         ratio=(0.3, 1 / 0.3), value="random"))
        return T.Compose(steps)

    @property
    def deterministic(self) -> bool:
        """True when no step draws random numbers (whole-view resize, no flip, RandAugment or
        erasing): an image then always gives the same tensor, which the datasets may cache."""
        return self.crop_scale[0] >= 1.0 and not (self.horizontal_flip or self.randaug or self.random_erasing > 0)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return self._pipeline(load_image(image))

    def to_dict(self) -> dict[str, Any]:
        """The settings, JSON- and YAML-friendly (lists, not tuples), for run logs."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def __getstate__(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_pipeline", self._build())


def is_deterministic(transform: Any) -> bool:
    """Whether an image transform gives an image the same tensor at every call, so its output can
    be computed once and cached: a :class:`TrainImageTransform` without random steps, or the
    evaluation pipeline (``Beit3ImageProcessor.preprocess``, a bound method of a processor that
    says so). Anything else counts as random."""
    owner = getattr(transform, "__self__", transform)
    return bool(getattr(owner, "deterministic", False))


def train_image_transform(
    image_size: int,
    mode: str = "vl",
    *,
    randaug: bool = True,
    crop_scale: Sequence[float] | None = None,
    random_erasing: float | None = None,
    horizontal_flip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TrainImageTransform:
    """The official training augmentation of ``mode`` at side ``image_size``.

    Args:
        image_size: output side S (the model's ``image_size``).
        mode: ``"vl"`` (VQAv2, NLVR2, captioning, retrieval) or ``"imagenet"`` (classification).
        randaug: apply the mode's RandAugment.
        crop_scale: area range of the random resized crop; defaults (0.5, 1) for vl and
            (0.08, 1) for imagenet.
        random_erasing: probability of random erasing; defaults 0.25 for imagenet and 0 for vl.
        horizontal_flip: random flips (official); turn off when labels say "left" or "right", as
            the synthetic world's questions and captions do.
        mean, std: normalisation; defaults 0.5/0.5 for vl and ImageNet's for imagenet.
    """
    defaults = mode_defaults(mode)
    return TrainImageTransform(
        image_size=int(image_size),
        mode=mode,
        crop_scale=tuple(float(s) for s in (defaults.crop_scale if crop_scale is None else crop_scale)),
        horizontal_flip=bool(horizontal_flip),
        randaug=bool(randaug),
        mean=tuple(float(m) for m in (defaults.mean if mean is None else mean)),
        std=tuple(float(s) for s in (defaults.std if std is None else std)),
        random_erasing=float(defaults.random_erasing if random_erasing is None else random_erasing),
    )


# ---------------------------------------------------------------------- captions
def mask_caption_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_prob: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official captioning corruption (``CaptioningDataset._masking_on_text_tokens``).

    For a row with ``n`` real tokens (BOS and EOS included) it picks
    ``max(1, min(int(n * mask_prob + 0.5), n - 1))`` distinct positions in ``1 .. n-1`` (BOS is
    never masked, EOS can be). Each picked token becomes ``mask_token_id`` with probability 0.8,
    stays itself with 0.1 and becomes a random id in ``[3, vocab_size - 1]`` with 0.1 (a range that
    includes ``<mask>``, as in the official code).

    Returns ``(masked_input_ids, masked_positions)``; ``masked_positions`` is bool ``(B, T)``.
    """
    if not 0 < mask_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    masked = input_ids.clone()
    positions = torch.zeros_like(input_ids, dtype=torch.bool)
    lengths = attention_mask.sum(dim=1).tolist()
    for row, n in enumerate(lengths):
        n = int(n)
        if n < 2:
            raise ValueError(f"row {row} has {n} real tokens; captions need at least BOS and EOS")
        count = max(1, min(int(n * mask_prob + 0.5), n - 1))
        picked = torch.randperm(n - 1, generator=generator)[:count] + 1
        draw = torch.rand(count, generator=generator)
        random_ids = torch.randint(3, vocab_size, (count,), generator=generator)
        replacement = torch.where(draw < 0.8, torch.full_like(random_ids, mask_token_id),
                                  torch.where(draw < 0.9, input_ids[row, picked], random_ids))
        masked[row, picked] = replacement
        positions[row, picked] = True
    return masked, positions
