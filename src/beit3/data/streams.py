"""Streamed pretraining data: images, texts and image-text pairs from tar shards, folders or text files.

Large image-text corpora come as WebDataset tar shards: a plain tar whose consecutive members
sharing a *key* (the path up to the first dot of the file name) form one sample, e.g. ``000123.jpg``
+ ``000123.txt`` (+ ``000123.json``, as img2dataset writes them). Local uncompressed tars are read
with the standard ``tarfile`` module by offset, so a sample can be re-read and resuming only reads
headers. Compressed shards (``.tar.gz``, ``.tgz``) and URLs (``http(s)://``, ``pipe:<command>``) are
*streamed* with the ``webdataset`` library (``pip install beit3[webdataset]``): each sample's bytes
are read in order and kept in memory until it is decoded, and resuming re-reads the slot's shards of
the current epoch up to the saved position (bytes only, nothing decoded) — exact, but the bytes are
fetched again.

A shard that cannot be read (a truncated tar, a failed download) ends that shard: the samples read
before stay, the rest of the shard is counted as skipped and the stream moves on (``strict`` raises).

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

import bisect
import contextlib
import glob
import io
import itertools
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from beit3.data.datasets import BadImageError, BadSampleWarning, load_image
from beit3.data.index import DataError, EmptyDatasetError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
META_KEYS = ("__slot__", "__epoch__", "__position__", "__skips__")
"""Bookkeeping keys of streamed samples: where each came from, and the units (shards or files) of
the bad samples skipped just before it -- so a loader in the main process can count what workers skipped."""
STREAM_PREFIXES = ("http://", "https://", "pipe:")
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")
INDEX_FILE = "beit3_shards.json"
"""Per-folder index of shard sample counts (see :func:`shard_sample_counts`)."""
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
"""What reading a damaged or vanished shard raises."""


def is_streamed(shard: str) -> bool:
    """Whether a shard must be read front to back: a URL, a ``pipe:`` command or a compressed tar."""
    return shard.startswith(STREAM_PREFIXES) or shard.lower().endswith(COMPRESSED_SUFFIXES)


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
    if text.startswith(STREAM_PREFIXES):
        return [text]  # a URL or command: only {a..b} ranges expand ("?" may be a query string)
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
        except Image.DecompressionBombError as err:
            raise BadImageError(f"refusing image {where}: {err}") from None
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


@dataclass(frozen=True)
class StreamedSample:
    """One sample of a streamed shard: its key and, per extension, the member's bytes."""

    shard: str
    key: str
    members: tuple[tuple[str, bytes], ...]


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _group(shard: str, members: Iterable[tuple[str, Any]], make: Callable[..., Any]) -> Iterator[Any]:
    """Consecutive (name, payload) members sharing a key become one ``make(shard, key, members)``."""
    key, group = None, []
    for name, payload in members:
        member_key, extension = _split_name(name)
        if member_key != key and group:
            yield make(shard, key, tuple(group))
            group = []
        key = member_key
        group.append((extension, *payload) if isinstance(payload, tuple) else (extension, payload))
    if group:
        yield make(shard, key, tuple(group))


def open_stream(url: str) -> Any:
    """A readable binary stream of a shard: ``webdataset.gopen`` for URLs and ``pipe:`` commands."""
    if not url.startswith(STREAM_PREFIXES):
        return open(url, "rb")
    try:
        from webdataset.gopen import gopen
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError(f"reading {url} needs the webdataset package: pip install 'beit3[webdataset]'") from None
    return gopen(url, "rb")


def _stream_members(url: str) -> Iterator[tuple[str, bytes]]:
    stream = open_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # "|*": sequential, gzip or plain
            for info in tar:
                if info.isfile():
                    handle = tar.extractfile(info)
                    yield info.name, handle.read() if handle is not None else b""
    finally:
        stream.close()  # webdataset's pipes raise here when curl or the command failed


def shard_sample_counts(shards: Sequence[str], *, write: bool = True) -> list[int | None]:
    """Samples per local shard, from ``beit3_shards.json`` in each shard's folder.

    A shard missing from its folder's index, or whose size or modification time changed, is counted
    by reading its headers; the index is then rewritten (atomically, when the folder is writable),
    so later starts (and the other ranks) only read one small file and ``stat`` each shard.
    Streamed shards (URLs, compressed tars) give ``None``: counting them means reading them.
    """
    by_folder: dict[str, list[int]] = {}
    for position, shard in enumerate(shards):
        if not is_streamed(shard):
            by_folder.setdefault(os.path.dirname(os.path.abspath(shard)), []).append(position)
    counts: list[int | None] = [None] * len(shards)
    for folder, positions in by_folder.items():
        index_path = os.path.join(folder, INDEX_FILE)
        try:
            with open(index_path, encoding="utf-8") as handle:
                known = json.load(handle).get("shards", {})
        except (OSError, ValueError, AttributeError):
            known = {}
        changed = False
        for position in positions:
            shard = shards[position]
            name = os.path.basename(shard)
            stat = os.stat(shard)
            entry = known.get(name)
            if not (isinstance(entry, dict) and entry.get("bytes") == stat.st_size
                    and entry.get("mtime_ns") == stat.st_mtime_ns):
                entry = {"samples": _count_readable(shard), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                known[name] = entry
                changed = True
            counts[position] = int(entry["samples"])
        if changed and write:
            _write_index(index_path, known)
    return counts


def _count_readable(shard: str) -> int:
    """Samples of a local shard up to where it cannot be read (a truncated tar keeps its first ones)."""
    count = 0
    try:
        for _ in _local_refs(shard):
            count += 1
    except SHARD_ERRORS as err:
        warnings.warn(f"shard {shard} is damaged after {count} samples ({err}); the rest is skipped",
                      BadSampleWarning, stacklevel=3)
    return count


def _write_index(path: str, shards: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"version": 1, "shards": dict(sorted(shards.items()))}, handle)
        os.replace(tmp, path)  # ranks writing at once write the same content
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        warnings.warn(f"cannot write the shard index {path} ({err}); shards are counted again next time",
                      stacklevel=3)


def write_shard_index(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, int]:
    """Count the samples of local shards once and record them in each folder's ``beit3_shards.json``."""
    paths = [path for path in expand_paths(shards) if not is_streamed(path)]
    return dict(zip(paths, (int(n) for n in shard_sample_counts(paths))))


def _local_refs(shard: str) -> Iterator[TarRef]:
    with tarfile.open(shard, mode="r:") as tar:
        members = ((info.name, (info.offset_data, info.size)) for info in tar if info.isfile())
        yield from _group(shard, members, TarRef)


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

    def refs(self, unit: str) -> Iterator[TarRef | StreamedSample]:
        """Offsets of a local tar's samples; a streamed shard's samples with their bytes."""
        if is_streamed(unit):
            return _group(unit, _stream_members(unit), StreamedSample)
        return _local_refs(unit)

    def sample_counts(self) -> list[int | None]:
        """Samples per shard from the shard index (:func:`shard_sample_counts`)."""
        return shard_sample_counts(self.shards)

    def _handle(self, shard: str) -> io.BufferedReader:
        # A small LRU of open files: the shuffle buffer mixes samples of a few recent shards.
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            self._handles[shard] = open(shard, "rb")
            if len(self._handles) > self.open_files:
                self._handles.popitem(last=False)[1].close()
        return self._handles[shard]

    def load(self, ref: TarRef | StreamedSample) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": ref.key, "__url__": ref.shard}
        for extension, data in self._member_bytes(ref):
            value = _decode(extension, data, f"{ref.shard}:{ref.key}.{extension}")
            sample[extension] = value
            if extension in IMAGE_EXTENSIONS and "image" not in sample:
                sample["image"] = value
        if "txt" in sample:
            sample["text"] = sample["txt"]
        return sample

    def _member_bytes(self, ref: TarRef | StreamedSample) -> Iterator[tuple[str, bytes]]:
        if isinstance(ref, StreamedSample):
            yield from ref.members
            return
        handle = self._handle(ref.shard)
        for extension, offset, size in ref.members:
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise DataError(f"{ref.shard}:{ref.key}.{extension} is truncated ({len(data)} of {size} bytes)")
            yield extension, data

    def __getstate__(self) -> dict[str, Any]:
        # Open files cannot cross into data-loader worker processes; each worker reopens its own.
        return {**self.__dict__, "_handles": OrderedDict()}


class ShardRefs(Sequence):
    """The sample references of local tar shards as a lazy sequence, for random access (map-style datasets).

    Its length comes from the shard index (:func:`shard_sample_counts`), so building it reads one
    small file per folder, not every tar header; a shard's references are read the first time one of
    its samples is asked for, once per process (data-loader worker). An item a damaged shard no
    longer holds is ``None`` (the dataset skips and counts it).
    """

    def __init__(self, source: TarShards) -> None:
        streamed = [shard for shard in source.shards if is_streamed(shard)]
        if streamed:
            raise DataError(f"{streamed[0]} is streamed (a URL, pipe: or a compressed tar) and cannot be read by "
                            "random access; download / decompress the shards to local .tar files, or read them "
                            "with SampleStream")
        self.source = source
        counts = [int(n or 0) for n in source.sample_counts()]
        self.starts = [0]
        for count in counts:
            self.starts.append(self.starts[-1] + count)
        self._cache: dict[int, list[TarRef]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> TarRef | None:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard = bisect.bisect_right(self.starts, index) - 1
        refs = self._cache.get(shard)
        if refs is None:
            refs = self._cache[shard] = self._read(self.source.shards[shard])
        local = index - self.starts[shard]
        return refs[local] if local < len(refs) else None

    @staticmethod
    def _read(shard: str) -> list[TarRef]:
        refs: list[TarRef] = []
        try:
            refs.extend(_local_refs(shard))
        except SHARD_ERRORS as err:
            warnings.warn(f"shard {shard} is damaged after {len(refs)} samples ({err}); the rest is skipped",
                          BadSampleWarning, stacklevel=3)
        return refs

    def shard_of(self, index: int) -> str:
        return self.source.shards[bisect.bisect_right(self.starts, index % len(self)) - 1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}  # each worker reads the shards it touches


class RefRange(Sequence):
    """``refs[start:stop]`` of a lazy reference sequence, without reading it."""

    def __init__(self, refs: Sequence, start: int, stop: int) -> None:
        self.refs, self.start, self.stop = refs, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.refs[self.start + index % len(self)]

    def shard_of(self, index: int) -> str | None:
        shard_of = getattr(self.refs, "shard_of", None)
        return shard_of(self.start + index % len(self)) if shard_of else None


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
        shards = [path for path in self.files if path.lower().endswith((".tar", *COMPRESSED_SUFFIXES))
                  or path.startswith(STREAM_PREFIXES) or (os.path.isfile(path) and tarfile.is_tarfile(path))]
        if shards:
            raise DataError(f"{shards[0]} is a tar shard, but texts are read from plain text files (one sample "
                            "a line); image-text shards belong in the pairs source, images in the images source")

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


def head_refs(source: Source, count: int) -> tuple[list[Any], dict[str, int]]:
    """The first ``count`` sample references of ``source`` in unit order, and how many each unit gave.

    For holding out validation samples from a stream: pass the counts as the training
    ``SampleStream``'s ``holdout``. Only the units needed are read (a streamed shard up to the
    samples taken); streamed references hold their bytes, so the list can be read at random.
    """
    refs: list[Any] = []
    taken: dict[str, int] = {}
    for unit in source.units():
        if len(refs) >= count:
            break
        unit_refs = iter(source.refs(unit))
        try:
            for ref in unit_refs:
                refs.append(ref)
                taken[unit] = taken.get(unit, 0) + 1
                if len(refs) >= count:
                    break
        except SHARD_ERRORS as err:
            warnings.warn(f"shard {unit} cannot be read further ({err}); validation takes the next",
                          BadSampleWarning, stacklevel=2)
        finally:
            close = getattr(unit_refs, "close", None)  # a generator over a stream: stop reading it
            if close is not None:
                close()
    return refs, taken


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
    otherwise call ``set_epoch`` before each pass. ``transform`` receives the sample dict (with its
    ``__slot__``, ``__epoch__`` and ``__position__``, e.g. to seed per-sample randomness) and must
    return a dict. ``holdout`` maps units to a number of their first samples left out (the
    validation samples :func:`head_refs` took). Samples that lack a field or whose image cannot be
    read are skipped with a warning and counted in ``skipped`` (per process); ``strict=True`` raises
    instead.
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
        holdout: Mapping[str, int] | None = None,
    ) -> None:
        self.source = source
        self.holdout = dict(holdout or {})
        self.fields = tuple(fields)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.infinite = infinite
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.strict = strict
        self.epoch = 0
        self.skipped = 0
        self.skipped_by_shard: Counter[str] = Counter()
        """Skipped samples per unit (shard or file) in this process; a damaged shard counts once."""
        self._resume: dict[int, tuple[int, int]] = {}
        self._resume_slots: int | None = None
        self._pending_skips: list[str] = []

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
            refs: Iterable[Any] = (ref for unit in units[slot::slots] for ref in self._unit_refs(unit))
        else:
            every = (ref for unit in units for ref in self._unit_refs(unit))
            refs = (ref for number, ref in enumerate(every) if number % slots == slot)
        if self.shuffle_buffer > 1:
            rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + slot)
            refs = buffered_shuffle(refs, self.shuffle_buffer, rng)
        return iter(refs)

    def _unit_refs(self, unit: str) -> Iterator[Any]:
        """A unit's references; a unit that fails to read ends there (counted once), unless ``strict``."""
        try:
            yield from itertools.islice(self.source.refs(unit), self.holdout.get(unit, 0), None)
        except SHARD_ERRORS as err:
            if self.strict:
                raise DataError(f"cannot read shard {unit}: {err}") from err
            self._skip(unit, f"shard {unit} cannot be read further: {err}")

    def _skip(self, unit: str | None, message: str) -> None:
        self.skipped += 1
        self.skipped_by_shard[str(unit)] += 1
        self._pending_skips.append(str(unit))
        warnings.warn(f"skipping sample: {message}", BadSampleWarning, stacklevel=4)

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
                meta = {"__slot__": slot, "__epoch__": epoch, "__position__": position}
                if self.transform:
                    sample = self.transform({**sample, **meta})
                sample.update(meta, __skips__=self._pending_skips)
                self._pending_skips = []
                yield sample
            if not self.infinite:
                return
            epoch, start = epoch + 1, 0

    def _load(self, ref: Any) -> dict[str, Any] | None:
        try:
            return load_checked(self.source, ref, self.fields)
        except DataError as err:
            if self.strict:
                raise
            self._skip(getattr(ref, "shard", None) or _unit_of(ref), str(err))
            return None


def _unit_of(ref: Any) -> str | None:
    if isinstance(ref, tuple) and ref and isinstance(ref[0], str):
        return ref[0]  # TextFiles: (path, line, text)
    return ref if isinstance(ref, str) else None


SAMPLE_ERRORS = (BadImageError, DataError, UnicodeDecodeError, json.JSONDecodeError, ValueError, OSError)
"""What decoding one bad sample raises (an undecodable, truncated or oversized image, bad text or JSON)."""


def load_checked(source: Source, ref: Any, fields: Sequence[str]) -> dict[str, Any]:
    """``source.load(ref)`` with every one of ``fields`` present and non-empty; any failure is a
    ``DataError`` naming the shard and key (``<shard>:<key>``)."""
    where = f"{getattr(ref, 'shard', None) or _unit_of(ref) or '?'}:{getattr(ref, 'key', None) or '?'}"
    try:
        sample = source.load(ref)
    except SAMPLE_ERRORS as err:
        message = str(err)
        raise DataError(message if where in message else f"{where}: {message}") from err
    if "__url__" in sample:
        where = f"{sample['__url__']}:{sample.get('__key__')}"
    elif "__key__" in sample:
        where = str(sample["__key__"])
    for name in fields:
        value = sample.get(name)
        if value is None:
            hint = {"text": " (no .txt member)", "image": " (no image member)"}.get(name, "")
            raise DataError(f"{where} has no {name}{hint}")
        if isinstance(value, str) and not value.strip():
            raise DataError(f"{where} has an empty {name}")
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


def skipped_before(samples: Sequence[dict[str, Any]]) -> list[str]:
    """The units of the bad samples a stream skipped on its way to ``samples`` (one entry per sample)."""
    return [unit for sample in samples for unit in sample.get("__skips__", ())]


def split_meta(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, int, int]]]:
    """Separate the stream's bookkeeping keys from sample contents, for collate functions."""
    metas = [(s["__slot__"], s["__epoch__"], s["__position__"]) for s in samples]
    return [{k: v for k, v in s.items() if k not in META_KEYS} for s in samples], metas
