import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from beit3.data.datasets import BadSampleWarning
from beit3.data.index import DataError
from beit3.data.streams import (
    ImageFolder,
    PositionTracker,
    SampleStream,
    TarShards,
    TextFiles,
    expand_paths,
    split_meta,
)
from beit3.data.synthetic import write_shards

from .conftest import make_image


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_shards(folder: Path, total: int, shards: int) -> list[str]:
    samples = ({"__key__": f"s{n:04d}".encode(), "jpg": jpeg(n % 256), "txt": f"caption {n}".encode()} for n in range(total))
    write_shards(samples, str(folder / "pairs-{shard:06d}.tar"), shards, total)
    return [f"s{n:04d}" for n in range(total)]


def keep_list(samples):
    return samples


def read_rank(shards, rank: int, world: int, workers: int, **kw) -> list[dict]:
    stream = SampleStream(TarShards(shards), fields=("image", "text"), rank=rank, world_size=world, seed=3, **kw)
    loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=keep_list)
    return [sample for batch in loader for sample in batch]


@pytest.mark.parametrize("shard_count", [4, 6, 3])  # 3 < 4 slots: samples are strided instead of shards
def test_two_ranks_two_workers_read_every_sample_exactly_once(tmp_path, shard_count):
    keys = make_shards(tmp_path, 30, shard_count)
    seen = [s["__key__"] for rank in (0, 1) for s in read_rank(str(tmp_path), rank, 2, 2, shuffle_buffer=8)]
    assert Counter(seen) == Counter(keys)


def test_sample_contents_and_shard_spec(tmp_path):
    make_shards(tmp_path, 10, 2)
    assert expand_paths(str(tmp_path / "pairs-{000000..000001}.tar")) == expand_paths(str(tmp_path))
    sample = next(iter(SampleStream(TarShards(str(tmp_path / "pairs-*.tar")), fields=("image",), shuffle_buffer=0)))
    assert sample["__key__"] == "s0000" and sample["text"] == "caption 0"
    assert isinstance(sample["image"], Image.Image) and sample["image"].size == (4, 4)
    assert (sample["__slot__"], sample["__epoch__"], sample["__position__"]) == (0, 0, 0)


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    make_shards(tmp_path, 40, 4)

    def order(seed, epoch):
        stream = SampleStream(TarShards(str(tmp_path)), fields=("text",), seed=seed, shuffle_buffer=10)
        stream.set_epoch(epoch)
        return [s["__key__"] for s in stream]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


def test_resume_after_n_samples_continues_where_it_stopped(tmp_path):
    make_shards(tmp_path, 40, 4)

    def stream():
        return SampleStream(TarShards(str(tmp_path)), fields=("image", "text"), seed=5, shuffle_buffer=16, infinite=True)

    full = [s["__key__"] for _, s in zip(range(70), stream())]  # crosses into the second epoch
    tracker, first = PositionTracker(), []
    for _, sample in zip(range(13), stream()):
        first.append(sample["__key__"])
        tracker.update(split_meta([sample])[1], slots=1)
    resumed = stream()
    resumed.load_state_dict(tracker.state_dict())
    rest = [s["__key__"] for _, s in zip(range(57), resumed)]
    assert first + rest == full


def test_resume_with_a_different_layout_is_refused(tmp_path):
    make_shards(tmp_path, 8, 2)
    stream = SampleStream(TarShards(str(tmp_path)), fields=("text",), rank=0, world_size=2)
    stream.load_state_dict({"slots": 4, "positions": {"0": [0, 1]}})
    with pytest.raises(DataError, match="4 loader slots"):
        next(iter(stream))


def test_corrupt_sample_in_a_shard_is_skipped_and_counted(tmp_path):
    samples = [{"__key__": b"a", "jpg": jpeg(1), "txt": b"ok"}, {"__key__": b"b", "jpg": b"garbage", "txt": b"bad"},
               {"__key__": b"c", "jpg": jpeg(2)}, {"__key__": b"d", "jpg": jpeg(3), "txt": b"fine"}]
    write_shards(iter(samples), str(tmp_path / "x-{shard:06d}.tar"), 1, 4)
    stream = SampleStream(TarShards(str(tmp_path)), fields=("image", "text"), shuffle_buffer=0)
    with pytest.warns(BadSampleWarning):
        keys = [s["__key__"] for s in stream]
    assert keys == ["a", "d"] and stream.skipped == 2  # b: corrupt image, c: no caption
    strict = SampleStream(TarShards(str(tmp_path)), fields=("image", "text"), shuffle_buffer=0, strict=True)
    with pytest.raises(DataError, match="b.jpg"):
        list(strict)


def test_text_files_and_image_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.txt").write_text("third\n")
    texts = SampleStream(TextFiles([tmp_path / "a.txt", tmp_path / "b.txt"]), fields=("text",), shuffle_buffer=0)
    assert [s["text"] for s in texts] == ["first line", "second line", "third"]
    make_image(tmp_path / "imgs" / "x" / "one.png")
    make_image(tmp_path / "imgs" / "two.jpg")
    (tmp_path / "imgs" / "two.txt").write_text("a caption\n")
    pairs = SampleStream(ImageFolder(tmp_path / "imgs"), fields=("image", "text"), shuffle_buffer=0)
    with pytest.warns(BadSampleWarning, match="x/one has no text"):
        assert [(s["__key__"], s["text"]) for s in pairs] == [("two", "a caption")]
    ranks = [[s["__key__"] for s in SampleStream(ImageFolder(tmp_path / "imgs"), fields=("image",), rank=r, world_size=2)]
             for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == ["two", "x/one"] and all(len(keys) == 1 for keys in ranks)
