"""The masked-data-modeling dataset: one sample = one image, one text and one image-text pair.

So a batch of B samples holds B images, B texts and B pairs — the paper's 1 : 1 : 1 composition
(2048 + 2048 + 2048 = 6144 per step). Sample ``i`` takes item ``i mod n`` of each source, so the
dataset is as long as the largest source and the smaller ones repeat within an epoch.

Masking happens here, on the CPU, per sample: the block mask of each image (and of each pair
image, when ``pair_mask_image``), the BERT corruption of each text and caption. Visual-token
targets are *not* computed here: they need the tokenizer's forward, which the task runs on the
accelerator for the whole batch (as BEiT v2 does).

Every random draw of a training sample (masks, crop, flip, jitter, text corruption) is seeded by
``train.seed`` and the sample's place in the data (epoch and index here; shard order and position
in :class:`MaskedDataModelingStream`), never by the process or worker that reads it: 1 process and
2 see the same inputs, and a run resumed on another number of processes continues exactly.

A bad sample (an undecodable, truncated or oversized image, a pair without ``.txt``, an empty
caption) never stops a run: it is replaced by the next sample of its source (``index + 1``, ...,
so the choice is the same on a resumed run) and recorded under the sample's ``__skips__`` key as
``(source, shard)``; :func:`pretraining_collate` gathers those into the batch and the task counts
them. ``strict=True`` raises a ``DataError`` naming the shard and key instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset, default_collate

from beit3.data.datasets import DEFAULT_IMAGE_CACHE_MB, BadSampleWarning, ImageCache
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


class PretrainingTransform:
    """BEiT's augmentation (colour jitter, flip, random resized crop; paper Table 11) or a plain resize,
    then [-1, 1] pixels.

    One view serves both the backbone and the visual tokenizer: both read [-1, 1] pixels, so
    crop, flip and jitter are shared exactly as in BEiT v2's two-view pipeline. Captions that say
    "left of" are false after a flip; ``horizontal_flip=False`` for data whose text says it.

    The rules are torchvision's (``ColorJitter``, ``RandomHorizontalFlip``, ``RandomResizedCrop``),
    drawing from torch's global generator, but the crop's draws come in one call, the crop is one
    PIL resize of the cropped box and the pixels go straight from the image's bytes to the tensor:
    0.1 ms an image on the tiny recipe's 64 -> 32 px against 0.35 ms for the ``T.Compose`` of
    ``RandomResizedCrop``, ``ToTensor`` and ``Normalize``.
    """

    def __init__(self, image_size: int, train: bool, crop_scale: Sequence[float] = (0.2, 1.0),
                 color_jitter: float = 0.4, horizontal_flip: bool = True) -> None:
        self.size, self.train, self.scale = int(image_size), train, tuple(float(s) for s in crop_scale)
        self.ratio = (3 / 4, 4 / 3)
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if train and color_jitter > 0 else None
        self.flip = train and horizontal_flip

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``RandomResizedCrop``'s rule: up to 10 tries of an area fraction uniform in ``scale`` and a
        log-uniform aspect in ``ratio`` that fits, else the centre crop of the clamped aspect; its 40
        uniforms drawn at once from torch's global generator (left, top, right, bottom)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        draws = torch.rand(40).tolist()
        for t in range(0, 40, 4):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * draws[t])
            aspect = math.exp(log_lo + (log_hi - log_lo) * draws[t + 1])
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(draws[t + 2] * (height - h + 1)), int(draws[t + 3] * (width - w + 1))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        box = None
        if self.train:
            if self.jitter is not None:
                image = self.jitter(image)
            if self.flip and torch.rand(1) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = self._crop_box(*image.size)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * (1 / (255 * STD[0])) - MEAN[0] / STD[0]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))  # numpy: no torch call overhead


class MaskedSamples:
    """Decoded images, texts and pairs -> the model's masked inputs, for one image size and masking.

    The one place a pretraining sample is made: the map-style :class:`MaskedDataModelingDataset` and
    the streamed :class:`MaskedDataModelingStream` both call it. ``tokenizer`` is a
    :class:`beit3.processing.Beit3Tokenizer`.
    """

    def __init__(self, tokenizer: Any, *, image_size: int, patch_size: int, options: MaskingOptions = MaskingOptions(),
                 train: bool = True, crop_scale: Sequence[float] = (0.2, 1.0), color_jitter: float = 0.4,
                 horizontal_flip: bool = True) -> None:
        self.tokenizer, self.options, self.train = tokenizer, options, train
        self.transform = PretrainingTransform(image_size, train, crop_scale, color_jitter, horizontal_flip)
        grid = image_size // patch_size
        self.masker = BlockMaskingGenerator.from_ratio(grid, options.image_mask_ratio,
                                                       min_num_patches=options.min_block_patches)
        self.special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def _masked_text(self, text: str, length: int, prob: float, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([text], max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        corrupted, labels = mask_text_tokens(ids, attention, prob, mask_token_id=self.tokenizer.mask_token_id,
                                             vocab_size=self.tokenizer.vocab_size, special_ids=self.special_ids,
                                             generator=generator)
        return {"input_ids": corrupted[0], "attention_mask": attention[0], "labels": labels[0]}

    def text(self, text: str, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        """``text_input_ids`` / ``text_attention_mask`` / ``text_labels`` of a text-only sample."""
        part = self._masked_text(text, self.options.text_length, self.options.text_mask_prob, generator)
        return {f"text_{key}": value for key, value in part.items()}

    def caption(self, text: str, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        """``pair_input_ids`` / ``pair_attention_mask`` / ``pair_labels`` of a pair's caption."""
        part = self._masked_text(text, self.options.caption_length, self.options.pair_mask_prob, generator)
        return {f"pair_{key}": value for key, value in part.items()}

    def image(self, image: Any, mask: Any) -> dict[str, Any]:
        """``image_pixel_values`` (augmented, [-1, 1]) and ``image_mask`` (the block mask) of an image."""
        return {"image_pixel_values": self.transform(image.convert("RGB")), "image_mask": mask}

    def pair_image(self, image: Any, mask: Any) -> dict[str, Any]:
        """``pair_pixel_values``, and ``pair_image_mask`` when pair images are masked too."""
        out = {"pair_pixel_values": self.transform(image.convert("RGB"))}
        if self.options.pair_mask_image:
            out["pair_image_mask"] = mask
        return out


class MaskedDataModelingDataset(Dataset):
    """Map-style dataset over three lists of sample references.

    images / texts / pairs: (source, refs) with ``source.load(ref)`` returning a dict with
    ``image`` and/or ``text`` (the :mod:`beit3.data.streams` sources). With ``train=False`` (in
    ``samples``) masks are seeded by the index, so validation sees the same masks every time.
    Decoded images stay in memory up to ``image_cache_mb`` (per process; 0 turns it off), so a
    small set is decoded once instead of once per epoch.
    """

    def __init__(self, images: tuple[Any, Sequence[Any]], texts: tuple[Any, Sequence[Any]],
                 pairs: tuple[Any, Sequence[Any]], samples: MaskedSamples, *, seed: int = 0,
                 strict: bool = False, image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB) -> None:
        for name, (_, refs) in (("images", images), ("texts", texts), ("pairs", pairs)):
            if not refs:
                raise ValueError(f"the pretraining {name} source is empty")
        self.images, self.texts, self.pairs = images, texts, pairs
        self.samples, self.train, self.seed, self.strict = samples, samples.train, seed, strict
        self.epoch = 0
        # Decoded samples by (source, position), up to image_cache_mb of pixels per process, in the
        # task datasets' cache: a small set is decoded once, not every epoch.
        self.cache = ImageCache(int(image_cache_mb * 2**20))

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
                return self.cache.cached((name, position), lambda: load_checked(loader, ref, SOURCE_FIELDS[name]),
                                         _pixel_bytes)
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

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next samples belong to (the engine sets it before each epoch's loader)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Training draws are seeded by (seed, epoch, index): the same masks and crops on any number of
        # processes and workers, and after a resume. Validation's by the index alone: the same every time.
        entropy = [self.seed, self.epoch, index] if self.train else [self.seed, index]
        with seeded_draws(entropy) as rng:
            make = self.samples
            skips: list[tuple[str, str]] = []
            image = self._load("images", index, skips)["image"]
            text = self._load("texts", index, skips)["text"]
            pair = self._load("pairs", index, skips)
            masks = make.masker(2, rng)
            text_part = make.text(text, rng)
            caption_part = make.caption(pair["text"], rng)
            return {**make.image(image, masks[0]), **text_part, **make.pair_image(pair["image"], masks[1]),
                    **caption_part, SKIPS_KEY: skips}


def _pixel_bytes(sample: dict[str, Any]) -> int:
    image = sample.get("image")
    return 0 if image is None else image.width * image.height * 3


@contextlib.contextmanager
def seeded_draws(entropy: Sequence[int]) -> Iterator[np.random.Generator]:
    """A numpy generator seeded by ``entropy`` (masks and text corruption draw from it), with torch's
    global CPU generator (which the augmentation draws from) seeded by it too inside the block and
    restored after it.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every accelerator's generators,
    which ``fork_rng(devices=[])`` does not restore (on a GPU, the data of a ``num_workers=0`` run would
    reseed the model's dropout every sample), and before CUDA is initialised it records a stack trace
    per call (2.5 ms a sample, a third of the tiny pretraining step on CPU)."""
    mask_seed, torch_seed = (int(x) >> 1 for x in np.random.SeedSequence(list(entropy)).generate_state(2, np.uint64))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed)
        yield np.random.default_rng(mask_seed)


STREAM_KINDS = tuple(SOURCE_FIELDS)  # images, texts, pairs: the order seeds depend on


class _StreamedSample:
    """A stream's transform: one kind's masked inputs, with every random draw seeded by the sample's
    place in its stream (slot, epoch, position), so a resumed run makes the very same masks and crops."""

    def __init__(self, samples: MaskedSamples, kind: str, seed: int) -> None:
        self.samples, self.kind, self.seed = samples, kind, seed

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        entropy = [self.seed, STREAM_KINDS.index(self.kind), sample["__slot__"], sample["__epoch__"],
                   sample["__position__"]]
        make = self.samples
        with seeded_draws(entropy) as rng:
            if self.kind == "images":
                return make.image(sample["image"], make.masker(1, rng)[0])
            if self.kind == "texts":
                return make.text(sample["text"], rng)
            return {**make.pair_image(sample["image"], make.masker(1, rng)[0]),
                    **make.caption(sample["text"], rng)}


class MaskedDataModelingStream:
    """Training data of ``beit3 pretrain`` read as streams: ``.tar.gz`` shards, ``http(s)://`` and
    ``pipe:`` URLs, or local tars with ``task.options.streaming=true``.

    Each source is an endless :class:`~beit3.data.SampleStream` (shuffled shards and a shuffle
    buffer, a new order every epoch of that source); a :class:`~beit3.data.MixingLoader` zips them,
    so each micro-batch holds ``micro_batch`` images, texts and pairs, as the map-style dataset's do.
    Bad samples are skipped and counted by the streams (``skipped_samples``). ``holdout`` names, per
    source, the first samples of some units that validation took (:func:`beit3.data.streams.head_refs`).

    ``state_dict()`` is this process's data position; the engine saves every process's and hands
    them all back (``load_state_dict``) on resume. With the same number of processes and data-loader
    workers the run continues with exactly the samples (and masks and crops) it would have seen;
    with another number it starts the saved epoch of each source again in the new layout.
    """

    def __init__(self, sources: dict[str, Any], samples: MaskedSamples, *, seed: int = 0, shuffle_buffer: int = 1000,
                 strict: bool = False, holdout: dict[str, dict[str, int]] | None = None) -> None:
        from beit3.data.streams import SampleStream

        holdout = holdout or {}
        self.streams = {
            name: SampleStream(sources[name], fields=SOURCE_FIELDS[name], shuffle_buffer=shuffle_buffer,
                               seed=seed + 7919 * k, infinite=True, transform=_StreamedSample(samples, name, seed),
                               strict=strict, holdout=holdout.get(name))
            for k, name in enumerate(STREAM_KINDS)
        }
        self._loader: Any = None
        self._saved: list[dict[str, Any]] | None = None

    def batches(self, micro_batch: int, *, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        """Endless micro-batches of ``micro_batch`` images + texts + pairs, from this process's slots."""
        from beit3.data.mixing import MixingLoader
        from beit3.data.streams import current_rank_and_world

        loader = MixingLoader(self.streams, batch_size=len(STREAM_KINDS) * micro_batch,
                              proportions={name: 1.0 for name in STREAM_KINDS},
                              collate={name: default_collate for name in STREAM_KINDS},
                              num_workers=num_workers, pin_memory=pin_memory)
        if self._saved is not None:
            self._restore(loader, current_rank_and_world()[1] * max(1, num_workers))
        self._loader = loader
        for parts in loader:
            batch = {key: value for part in parts.values() for key, value in part.items()}
            batch[SKIPS_KEY] = []  # the streams count their own (skipped_samples)
            yield batch

    def _restore(self, loader: Any, slots: int) -> None:
        saved, self._saved = self._saved, None
        merged: dict[str, dict[str, Any]] = {}
        for state in saved:  # every process's positions: each slot's last consumed sample
            for name, part in state.items():
                into = merged.setdefault(name, {"slots": part["slots"], "positions": {}})
                into["positions"].update(part["positions"])
        for name, state in merged.items():
            if state["slots"] in (None, slots):
                continue
            epoch = min((int(p[0]) for p in state["positions"].values()), default=0)
            warnings.warn(f"pretraining {name}: the data position was saved with {state['slots']} loader slots "
                          f"(processes x workers), this run has {slots}; starting epoch {epoch} of the stream "
                          "again in the new layout", stacklevel=3)
            self.streams[name].set_epoch(epoch)
            state["slots"] = None  # nothing to resume exactly
        loader.load_state_dict(merged)

    def state_dict(self) -> dict[str, Any]:
        """This process's consumed positions per source (empty before the first batch)."""
        if self._loader is None:
            return {}
        return {name: {k: v for k, v in part.items() if k != "skipped"}
                for name, part in self._loader.state_dict().items()}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Resume from the ``state_dict()`` of every process of the saved run (applied at ``batches``)."""
        self._saved = [state for state in states if state]

    def skipped_samples(self) -> dict[str, dict[str, int]]:
        """Bad samples this process's streams skipped in the batches consumed: source -> shard -> count."""
        return self._loader.skipped_samples() if self._loader is not None else {}


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
