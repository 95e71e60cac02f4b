import pytest

from beit3.data.mixing import MixingLoader, split_batch_size
from beit3.data.streams import SampleStream, TarShards, TextFiles

from .test_streams import make_shards


def test_split_batch_size_follows_proportions():
    assert split_batch_size(6144, {"images": 1, "texts": 1, "pairs": 1}) == {"images": 2048, "texts": 2048, "pairs": 2048}
    assert split_batch_size(10, {"images": 1, "texts": 1, "pairs": 1}) == {"images": 4, "texts": 3, "pairs": 3}
    assert split_batch_size(8, {"images": 1, "texts": 0, "pairs": 3}) == {"images": 2, "pairs": 6}
    with pytest.raises(ValueError, match="too small"):
        split_batch_size(2, {"images": 1, "texts": 1, "pairs": 1})
    with pytest.raises(ValueError):
        split_batch_size(8, {"images": -1, "pairs": 1})


def streams(folder):
    (folder / "texts.txt").write_text("".join(f"text {n}\n" for n in range(50)))
    return {
        "images": SampleStream(TarShards(str(folder / "img")), fields=("image",), seed=1, shuffle_buffer=8, infinite=True),
        "texts": SampleStream(TextFiles(folder / "texts.txt"), fields=("text",), seed=1, shuffle_buffer=8, infinite=True),
        "pairs": SampleStream(TarShards(str(folder / "img")), fields=("image", "text"), seed=2, shuffle_buffer=8, infinite=True),
    }


def test_batches_hold_each_kind_in_proportion(tmp_path):
    make_shards(tmp_path / "img", 24, 2)
    loader = MixingLoader(streams(tmp_path), batch_size=12, proportions={"images": 1, "texts": 2, "pairs": 1})
    batch = next(iter(loader))
    assert {name: len(samples) for name, samples in batch.items()} == {"images": 3, "texts": 6, "pairs": 3}
    assert all("image" in s for s in batch["images"]) and all("text" in s for s in batch["texts"])
    assert all(not key.startswith("__") or key in ("__key__", "__url__") for s in batch["pairs"] for key in s)
    default = next(iter(MixingLoader(streams(tmp_path), batch_size=6)))
    assert {name: len(samples) for name, samples in default.items()} == {"images": 2, "texts": 2, "pairs": 2}


def keys(batch):
    return {name: [s["__key__"] for s in samples] for name, samples in batch.items()}


def test_resume_with_workers_continues_without_gaps_or_repeats(tmp_path):
    make_shards(tmp_path / "img", 24, 4)
    reference = MixingLoader(streams(tmp_path), batch_size=6, num_workers=2)
    full = [keys(b) for _, b in zip(range(10), reference)]

    first = MixingLoader(streams(tmp_path), batch_size=6, num_workers=2)
    seen = [keys(b) for _, b in zip(range(4), first)]  # stop at a round of both workers
    state = first.state_dict()
    second = MixingLoader(streams(tmp_path), batch_size=6, num_workers=2)
    second.load_state_dict(state)
    seen += [keys(b) for _, b in zip(range(6), second)]
    assert seen == full


def test_resume_mid_round_repeats_nothing(tmp_path):
    make_shards(tmp_path / "img", 24, 4)
    first = MixingLoader(streams(tmp_path), batch_size=6, num_workers=2)
    seen = [keys(b) for _, b in zip(range(3), first)]  # worker 0 has delivered one batch more than worker 1
    second = MixingLoader(streams(tmp_path), batch_size=6, num_workers=2)
    second.load_state_dict(first.state_dict())
    seen += [keys(b) for _, b in zip(range(5), second)]
    for name in ("images", "pairs"):  # 16 of 24 samples: the first epoch is not over yet
        drawn = [key for batch in seen for key in batch[name]]
        assert len(drawn) == len(set(drawn)) == 16
