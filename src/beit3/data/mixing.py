"""The pretraining loader: every batch holds images, texts and image-text pairs in fixed proportions.

BEiT-3 trains one masked-data-modeling objective on all three kinds at once (2048 images + 2048
texts + 2048 pairs per step in the paper, hence 1:1:1 by default). Each kind is its own
``SampleStream`` behind its own ``DataLoader``, with a batch size proportional to its share, and
the loader zips them. It also tracks which samples the training loop consumed, so ``state_dict`` is
all a checkpoint needs to resume the data exactly, and counts the bad samples each stream skipped
(in whichever process read them) as their batches arrive: ``skipped_samples()``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader

from beit3.data.streams import PositionTracker, SampleStream, current_rank_and_world, skipped_before, split_meta

DEFAULT_PROPORTIONS = {"images": 1.0, "texts": 1.0, "pairs": 1.0}


def split_batch_size(batch_size: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Share ``batch_size`` by ``proportions`` (largest remainder); every kind with a positive share gets >= 1."""
    total = sum(proportions.values())
    if total <= 0 or any(share < 0 for share in proportions.values()):
        raise ValueError(f"proportions must be non-negative with a positive sum, got {dict(proportions)}")
    wanted = {name: batch_size * share / total for name, share in proportions.items()}
    sizes = {name: int(value) for name, value in wanted.items()}
    for name in sorted(wanted, key=lambda n: wanted[n] - sizes[n], reverse=True)[: batch_size - sum(sizes.values())]:
        sizes[name] += 1
    for name, share in proportions.items():
        if share > 0 and sizes[name] == 0:
            raise ValueError(f"batch size {batch_size} is too small to hold any {name} at proportions {dict(proportions)}")
    return {name: size for name, size in sizes.items() if size > 0}


def _list_collate(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(samples)


class _TrackedCollate:
    """Collate sample contents with the user's function and keep their positions beside the batch."""

    def __init__(self, collate: Callable[[Sequence[dict[str, Any]]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: Sequence[dict[str, Any]]) -> tuple[Any, list[tuple[int, int, int]], list[str]]:
        contents, metas = split_meta(samples)
        return self.collate(contents), metas, skipped_before(samples)


class MixingLoader:
    """Yield ``{"images": batch, "texts": batch, "pairs": batch}`` dicts composed by ``proportions``.

    ``streams`` maps a kind to its ``SampleStream`` (any names work; a kind with proportion 0 or no
    stream is left out). ``collate`` maps a kind to the function that turns its list of raw samples
    into a batch (e.g. a processor wrapper); without one a kind's batch is the list of samples.
    Iteration ends when the first stream ends, so use ``infinite=True`` streams for step-based training.
    """

    def __init__(
        self,
        streams: Mapping[str, SampleStream],
        *,
        batch_size: int,
        proportions: Mapping[str, float] | None = None,
        collate: Mapping[str, Callable[[Sequence[dict[str, Any]]], Any]] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        proportions = dict(proportions or {name: DEFAULT_PROPORTIONS.get(name, 1.0) for name in streams})
        unknown = set(proportions) - set(streams)
        if unknown:
            raise ValueError(f"proportions name kinds without a stream: {sorted(unknown)}")
        self.streams = dict(streams)
        self.batch_sizes = split_batch_size(batch_size, proportions)
        self.collate = dict(collate or {})
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.trackers = {name: PositionTracker() for name in self.batch_sizes}
        self.skipped: dict[str, Counter[str]] = {name: Counter() for name in self.batch_sizes}
        """Bad samples skipped per kind and shard, in batches consumed so far (all workers)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loaders = {
            name: iter(DataLoader(self.streams[name], batch_size=size, num_workers=self.num_workers,
                                  collate_fn=_TrackedCollate(self.collate.get(name, _list_collate)),
                                  pin_memory=self.pin_memory, drop_last=True))
            for name, size in self.batch_sizes.items()
        }
        default_world = current_rank_and_world()[1]
        slots = {name: (self.streams[name].world_size or default_world) * max(1, self.num_workers)
                 for name in loaders}
        while True:
            batch = {}
            for name, loader in loaders.items():
                try:
                    contents, metas, skips = next(loader)
                except StopIteration:
                    return
                self.trackers[name].update(metas, slots[name])
                self.skipped[name].update(skips)
                batch[name] = contents
            yield batch

    def skipped_samples(self) -> dict[str, dict[str, int]]:
        """Bad samples skipped so far: kind -> shard (or text file) -> count, every kind listed."""
        return {name: dict(counts) for name, counts in self.skipped.items()}

    def state_dict(self) -> dict[str, Any]:
        """Consumed positions (and skip counts) per kind; save it with the model checkpoint."""
        return {name: {**tracker.state_dict(), "skipped": dict(self.skipped[name])}
                for name, tracker in self.trackers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration continue right after the samples recorded in ``state``."""
        for name, stream_state in state.items():
            if stream_state["slots"] is not None:
                self.streams[name].load_state_dict(stream_state)
                self.trackers[name].slots = stream_state["slots"]
                self.trackers[name].positions = {int(s): tuple(p) for s, p in stream_state["positions"].items()}
            if name in self.skipped:
                self.skipped[name] = Counter({str(k): int(v) for k, v in stream_state.get("skipped", {}).items()})
