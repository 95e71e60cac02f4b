"""The masked-data-modeling dataset: one sample = one image, one text and one image-text pair.

So a batch of B samples holds B images, B texts and B pairs — the paper's 1 : 1 : 1 composition
(2048 + 2048 + 2048 = 6144 per step). Sample ``i`` takes item ``i mod n`` of each source, so the
dataset is as long as the largest source and the smaller ones repeat within an epoch.

Masking happens here, on the CPU, per sample: the block mask of each image (and of each pair
image, when ``pair_mask_image``), the BERT corruption of each text and caption. Visual-token
targets are *not* computed here: they need the tokenizer's forward, which the task runs on the
accelerator for the whole batch (as BEiT v2 does).

A bad sample (an undecodable, truncated or oversized image, a pair without ``.txt``, an empty
caption) never stops a run: it is replaced by the next sample of its source (``index + 1``, ...,
so the choice is the same on a resumed run) and recorded under the sample's ``__skips__`` key as
``(source, shard)``; :func:`pretraining_collate` gathers those into the batch and the task counts
them. ``strict=True`` raises a ``DataError`` naming the shard and key instead.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import Dataset, default_collate

from beit3.data.datasets import BadSampleWarning
from beit3.data.index import DataError
from beit3.data.streams import RefRange, ShardRefs, TarShards, load_checked
from beit3.pretraining.masking import BlockMaskingGenerator, mask_text_tokens

SKIPS_KEY = "__skips__"
"""Sample / batch key listing the ``(source, shard)`` of every bad sample replaced to make it."""
SOURCE_FIELDS = {"images": ("image",), "texts": ("text",), "pairs": ("image", "text")}
MAX_BAD_IN_A_ROW = 64
"""Consecutive bad samples after which a source is taken for broken (a ``DataError``)."""

MEAN = STD = (0.5, 0.5, 0.5)  # BEiT-3's normalisation, and the [-1, 1] range VQ-KD expects


@dataclasses.dataclass(frozen=True)
class MaskingOptions:
    text_mask_prob: float = 0.15
    pair_mask_prob: float = 0.5
    image_mask_ratio: float = 0.4
    min_block_patches: int = 16
    pair_mask_image: bool = True
    """Also mask 40% of each pair image block-wise and predict its visual tokens (VL-BEiT's
    reading; the BEiT-3 paper does not say, see docs/pretraining.md)."""
    text_length: int = 64
    """Tokens per text-only sample, BOS and EOS included."""
    caption_length: int = 32
    """Tokens per pair caption, BOS and EOS included."""


def pretraining_transform(image_size: int, train: bool, crop_scale: Sequence[float] = (0.2, 1.0),
                          color_jitter: float = 0.4, horizontal_flip: bool = True) -> T.Compose:
    """BEiT's augmentation (colour jitter, flip, random resized crop; paper Table 11) or a plain resize.

    One view serves both the backbone and the visual tokenizer: both read [-1, 1] pixels, so
    crop, flip and jitter are shared exactly as in BEiT v2's two-view pipeline. Captions that say
    "left of" are false after a flip; ``horizontal_flip=False`` for data whose text says it.
    """
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps: list[Any] = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
        steps += [T.RandomHorizontalFlip()] if horizontal_flip else []
        steps += [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=bicubic)]
    else:
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


class MaskedDataModelingDataset(Dataset):
    """Map-style dataset over three lists of sample references.

    images / texts / pairs: (source, refs) with ``source.load(ref)`` returning a dict with
    ``image`` and/or ``text`` (the :mod:`beit3.data.streams` sources). ``tokenizer`` is a
    :class:`beit3.processing.Beit3Tokenizer`. With ``train=False`` masks are seeded by the index,
    so validation sees the same masks every time.
    """

    def __init__(self, images: tuple[Any, list[Any]], texts: tuple[Any, list[Any]], pairs: tuple[Any, list[Any]],
                 tokenizer: Any, *, image_size: int, patch_size: int, options: MaskingOptions = MaskingOptions(),
                 train: bool = True, seed: int = 0, crop_scale: Sequence[float] = (0.2, 1.0),
                 color_jitter: float = 0.4, horizontal_flip: bool = True, strict: bool = False) -> None:
        for name, (_, refs) in (("images", images), ("texts", texts), ("pairs", pairs)):
            if not refs:
                raise ValueError(f"the pretraining {name} source is empty")
        self.images, self.texts, self.pairs = images, texts, pairs
        self.tokenizer, self.options, self.train, self.seed = tokenizer, options, train, seed
        self.strict = strict
        self.transform = pretraining_transform(image_size, train, crop_scale, color_jitter, horizontal_flip)
        grid = image_size // patch_size
        self.masker = BlockMaskingGenerator.from_ratio(grid, options.image_mask_ratio,
                                                       min_num_patches=options.min_block_patches)
        self.special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def __len__(self) -> int:
        return max(len(self.images[1]), len(self.texts[1]), len(self.pairs[1]))

    def _load(self, name: str, index: int, skips: list[tuple[str, str]]) -> dict[str, Any]:
        """Sample ``index`` of source ``name``, or the next good one after it (bad ones go to ``skips``)."""
        loader, refs = getattr(self, name)
        for attempt in range(MAX_BAD_IN_A_ROW):
            position = (index + attempt) % len(refs)
            ref = refs[position]
            try:
                if ref is None:  # a damaged shard ended before the index's count
                    raise DataError(f"{refs.shard_of(position)}: sample {position} is missing (the shard is damaged)")
                return load_checked(loader, ref, SOURCE_FIELDS[name])
            except DataError as err:
                if self.strict:
                    raise DataError(f"pretraining {name}: {err} (data.strict=true)") from err
                shard = getattr(ref, "shard", None) or (ref[0] if isinstance(ref, tuple) else None)
                if shard is None and hasattr(refs, "shard_of"):
                    shard = refs.shard_of(position)
                skips.append((name, str(shard)))
                warnings.warn(f"pretraining {name}: skipping sample: {err}", BadSampleWarning, stacklevel=2)
        raise DataError(f"pretraining {name}: {MAX_BAD_IN_A_ROW} bad samples in a row from sample {index}; "
                        "the source looks broken")

    def _masked_text(self, text: str, length: int, prob: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([text], max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        corrupted, labels = mask_text_tokens(ids, attention, prob, mask_token_id=self.tokenizer.mask_token_id,
                                             vocab_size=self.tokenizer.vocab_size, special_ids=self.special_ids,
                                             generator=generator)
        return {"input_ids": corrupted[0], "attention_mask": attention[0], "labels": labels[0]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.train:  # fresh masks every epoch; the engine seeds torch per rank and per worker
            seed = int(torch.randint(0, 2**62, ()).item())
        else:
            seed = self.seed * 1_000_003 + index
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        opts = self.options

        skips: list[tuple[str, str]] = []
        image = self._load("images", index, skips)["image"]
        text = self._load("texts", index, skips)["text"]
        pair = self._load("pairs", index, skips)
        masks = self.masker(2, rng)
        text_part = self._masked_text(text, opts.text_length, opts.text_mask_prob, generator)
        pair_part = self._masked_text(pair["text"], opts.caption_length, opts.pair_mask_prob, generator)
        sample = {
            "image_pixel_values": self.transform(image.convert("RGB")),
            "image_mask": masks[0],
            "text_input_ids": text_part["input_ids"],
            "text_attention_mask": text_part["attention_mask"],
            "text_labels": text_part["labels"],
            "pair_pixel_values": self.transform(pair["image"].convert("RGB")),
            "pair_input_ids": pair_part["input_ids"],
            "pair_attention_mask": pair_part["attention_mask"],
            "pair_labels": pair_part["labels"],
        }
        if opts.pair_mask_image:
            sample["pair_image_mask"] = masks[1]
        sample[SKIPS_KEY] = skips
        return sample


def pretraining_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of the tensors; ``__skips__`` becomes one list for the whole batch."""
    skips = [skip for sample in samples for skip in sample.get(SKIPS_KEY, ())]
    batch = default_collate([{k: v for k, v in sample.items() if k != SKIPS_KEY} for sample in samples])
    batch[SKIPS_KEY] = skips
    return batch


def collect_refs(source: Any) -> list[Any]:
    """Every sample reference of a :mod:`beit3.data.streams` source, in order."""
    return [ref for unit in source.units() for ref in source.refs(unit)]


def source_refs(source: Any) -> Sequence[Any]:
    """The references of a source for random access: lazy (:class:`ShardRefs`, counts from the shard
    index) for tar shards, every reference for the others (text files hold their text already)."""
    return ShardRefs(source) if isinstance(source, TarShards) else collect_refs(source)


def split_refs(refs: Sequence[Any], val_size: int) -> tuple[Sequence[Any], Sequence[Any]]:
    """(train, validation) references: the last ``val_size`` are held out."""
    cut = len(refs) - val_size
    return RefRange(refs, 0, cut), RefRange(refs, cut, len(refs))
