"""Streamed pretraining data: images, texts and image-text pairs from tar shards, folders or text files.

Large image-text corpora come as WebDataset tar shards: a plain tar whose consecutive members
sharing a *key* (the path up to the first dot of the file name) form one sample, e.g. ``000123.jpg``
+ ``000123.txt``. They are read here with the standard ``tarfile`` module; only uncompressed tars are
supported, because resuming needs to seek.

How a stream stays correct at scale:

* **No duplication across ranks and workers.** Each (rank, data-loader worker) pair is a *slot*. The
  units (shards, files) are shuffled with ``seed`` and the epoch, then unit ``i`` goes to slot
  ``i % slots``; when there are fewer units than slots, every slot walks all units and keeps every
  ``slots``-th sample instead.
* **Cheap shuffling.** A shuffle buffer holds sample *references* (tar offsets, file paths), not
  decoded images, so skipping ahead to resume reads tar headers only.
* **Resumable.** Every sample carries ``__slot__``, ``__epoch__`` and ``__position__`` (its index
  in its slot's shuffled order). ``PositionTracker`` records what the training loop consumed;
  ``SampleStream.load_state_dict`` restarts each slot right after it, so nothing is seen twice or
  skipped even though data-loader workers prefetch.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from beit3.data.datasets import BadImageError, BadSampleWarning, load_image
from beit3.data.index import DataError, EmptyDatasetError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
META_KEYS = ("__slot__", "__epoch__", "__position__")


class Source(Protocol):
    """Where samples come from: units to split between slots, cheap references, and loading."""

    def units(self) -> list[str]:
        """Independent pieces (shards, files), in a fixed order."""

    def refs(self, unit: str) -> Iterator[Any]:
        """Cheap references to the samples of one unit, in order, without decoding them."""

    def load(self, ref: Any) -> dict[str, Any]:
        """Read and decode one sample; raise ``BadImageError`` when its image cannot be read."""


def expand_paths(spec: str | os.PathLike | Sequence[str | os.PathLike], suffix: str = ".tar") -> list[str]:
    """Expand shard specs: ``a-{000..009}.tar`` ranges, globs, folders (all ``*suffix`` inside) and lists."""
    if not isinstance(spec, (str, os.PathLike)):
        return [path for item in spec for path in expand_paths(item, suffix)]
    text = str(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        return [path for n in range(int(first), int(last) + 1)
                for path in expand_paths(text[: match.start()] + str(n).zfill(width) + text[match.end():], suffix)]
    if os.path.isdir(text):
        return sorted(str(path) for path in Path(text).rglob(f"*{suffix}"))
    if any(char in text for char in "*?["):
        return sorted(glob.glob(text))
    return [text]


def _decode(extension: str, data: bytes, where: str) -> Any:
    if extension in IMAGE_EXTENSIONS:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImageError(f"cannot read image {where}: {err}") from None
    if extension in ("txt", "text", "caption"):
        return data.decode("utf-8").strip()
    if extension == "json":
        return json.loads(data)
    if extension == "cls":
        return int(data.decode("ascii").strip())
    return data


@dataclass(frozen=True)
class TarRef:
    """One sample inside a tar shard: its key and, per extension, the byte offset and size of the member."""

    shard: str
    key: str
    members: tuple[tuple[str, int, int], ...]


class TarShards:
    """WebDataset-format tar shards. Samples get ``image`` (first image member) and ``text`` (``.txt``) fields."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, open_files: int = 8) -> None:
        self.shards = expand_paths(shards)
        if not self.shards:
            raise EmptyDatasetError(f"no tar shard matches {shards}")
        self.open_files = open_files
        self._handles: OrderedDict[str, io.BufferedReader] = OrderedDict()

    def units(self) -> list[str]:
        return list(self.shards)

    def refs(self, unit: str) -> Iterator[TarRef]:
        key, members = None, []
        with tarfile.open(unit, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, name = os.path.split(info.name)
                stem, _, extension = name.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key and members:
                    yield TarRef(unit, key, tuple(members))
                    members = []
                key = member_key
                members.append((extension.lower(), info.offset_data, info.size))
        if members:
            yield TarRef(unit, key, tuple(members))

    def _handle(self, shard: str) -> io.BufferedReader:
        # A small LRU of open files: the shuffle buffer mixes samples of a few recent shards.
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            self._handles[shard] = open(shard, "rb")
            if len(self._handles) > self.open_files:
                self._handles.popitem(last=False)[1].close()
        return self._handles[shard]

    def load(self, ref: TarRef) -> dict[str, Any]:
        handle = self._handle(ref.shard)
        sample: dict[str, Any] = {"__key__": ref.key, "__url__": ref.shard}
        for extension, offset, size in ref.members:
            handle.seek(offset)
            value = _decode(extension, handle.read(size), f"{ref.shard}:{ref.key}.{extension}")
            sample[extension] = value
            if extension in IMAGE_EXTENSIONS and "image" not in sample:
                sample["image"] = value
        if "txt" in sample:
            sample["text"] = sample["txt"]
        return sample

    def __getstate__(self) -> dict[str, Any]:
        # Open files cannot cross into data-loader worker processes; each worker reopens its own.
        return {**self.__dict__, "_handles": OrderedDict()}


class ImageFolder:
    """Images anywhere under a folder; ``x.txt`` next to ``x.jpg`` becomes the pair's ``text``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = sorted(str(path) for path in self.root.rglob("*")
                            if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not self.files:
            raise EmptyDatasetError(f"no image under {self.root}")

    def units(self) -> list[str]:
        return list(self.files)

    def refs(self, unit: str) -> Iterator[str]:
        yield unit

    def load(self, ref: str) -> dict[str, Any]:
        path = Path(ref)
        sample: dict[str, Any] = {"__key__": path.relative_to(self.root).with_suffix("").as_posix(),
                                  "image": load_image(path)}
        caption = path.with_suffix(".txt")
        if caption.is_file():
            sample["text"] = caption.read_text(encoding="utf-8").strip()
        return sample


class TextFiles:
    """Plain text files, one sample per non-blank line (documents split into lines or paragraphs beforehand)."""

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        self.files = expand_paths(files, suffix=".txt")
        if not self.files:
            raise EmptyDatasetError(f"no text file matches {files}")

    def units(self) -> list[str]:
        return list(self.files)

    def refs(self, unit: str) -> Iterator[tuple[str, int, str]]:
        with open(unit, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    yield unit, line_no, line.strip()

    def load(self, ref: tuple[str, int, str]) -> dict[str, Any]:
        path, line_no, text = ref
        return {"__key__": f"{path}:{line_no}", "text": text}


def buffered_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle: fill a buffer of ``size``, then emit a random element for each new one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = rng.randrange(size)
        buffer[pick], item = item, buffer[pick]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def current_rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleStream(IterableDataset):
    """Stream samples having ``fields`` (e.g. ``("image",)``, ``("text",)``, ``("image", "text")``) from a source.

    ``infinite=True`` moves to the next epoch (a new shuffle) at the end, for step-based pretraining;
    otherwise call ``set_epoch`` before each pass. ``transform`` receives the sample dict and must
    return a dict. Samples that lack a field or whose image cannot be read are skipped with a warning
    and counted in ``skipped`` (per process); ``strict=True`` raises instead.
    """

    def __init__(
        self,
        source: Source,
        *,
        fields: Sequence[str],
        shuffle_buffer: int = 1000,
        seed: int = 0,
        infinite: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        strict: bool = False,
    ) -> None:
        self.source = source
        self.fields = tuple(fields)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.infinite = infinite
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.strict = strict
        self.epoch = 0
        self.skipped = 0
        self._resume: dict[int, tuple[int, int]] = {}
        self._resume_slots: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle the next pass uses (every rank must pass the same value)."""
        self.epoch = epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a ``PositionTracker.state_dict()``: each slot restarts after its last consumed sample."""
        self._resume_slots = state["slots"]
        self._resume = {int(slot): (epoch, position + 1) for slot, (epoch, position) in state["positions"].items()}

    def slot(self) -> tuple[int, int]:
        """(this slot, number of slots) for the calling process and data-loader worker."""
        rank, world = current_rank_and_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank * workers + worker, world * workers

    def refs(self, epoch: int, slot: int, slots: int) -> Iterator[Any]:
        """The shuffled references this slot reads in ``epoch``; the same on every run with the same seed."""
        units = self.source.units()
        random.Random(self.seed * 1_000_003 + epoch).shuffle(units)
        if len(units) >= slots:
            refs: Iterable[Any] = (ref for unit in units[slot::slots] for ref in self.source.refs(unit))
        else:
            every = (ref for unit in units for ref in self.source.refs(unit))
            refs = (ref for number, ref in enumerate(every) if number % slots == slot)
        if self.shuffle_buffer > 1:
            rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + slot)
            refs = buffered_shuffle(refs, self.shuffle_buffer, rng)
        return iter(refs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self.slot()
        if self._resume_slots is not None and self._resume_slots != slots:
            raise DataError(f"the resume state was saved with {self._resume_slots} loader slots "
                            f"(ranks x workers) but this run has {slots}; resume with the same layout")
        epoch, start = self._resume.get(slot, (self.epoch, 0))
        while True:
            for position, ref in enumerate(self.refs(epoch, slot, slots)):
                if position < start:
                    continue
                sample = self._load(ref)
                if sample is None:
                    continue
                if self.transform:
                    sample = self.transform(sample)
                sample.update({"__slot__": slot, "__epoch__": epoch, "__position__": position})
                yield sample
            if not self.infinite:
                return
            epoch, start = epoch + 1, 0

    def _load(self, ref: Any) -> dict[str, Any] | None:
        try:
            sample = self.source.load(ref)
            missing = [name for name in self.fields if not sample.get(name)]
            if missing:
                raise DataError(f"sample {sample.get('__key__')} has no {', '.join(missing)}")
        except (BadImageError, DataError, UnicodeDecodeError, json.JSONDecodeError) as err:
            if self.strict:
                raise
            self.skipped += 1
            warnings.warn(f"skipping sample: {err}", BadSampleWarning, stacklevel=3)
            return None
        return sample


class PositionTracker:
    """Remembers the last consumed (epoch, position) of every slot, from the meta keys of samples."""

    def __init__(self) -> None:
        self.slots: int | None = None
        self.positions: dict[int, tuple[int, int]] = {}

    def update(self, metas: Iterable[tuple[int, int, int]], slots: int) -> None:
        """Record consumed samples given as (slot, epoch, position)."""
        self.slots = slots
        for slot, epoch, position in metas:
            if (epoch, position) > self.positions.get(slot, (-1, -1)):
                self.positions[slot] = (epoch, position)

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "positions": {str(slot): list(pos) for slot, pos in self.positions.items()}}


def split_meta(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, int, int]]]:
    """Separate the stream's bookkeeping keys from sample contents, for collate functions."""
    metas = [(s["__slot__"], s["__epoch__"], s["__position__"]) for s in samples]
    return [{k: v for k, v in s.items() if k not in META_KEYS} for s in samples], metas
