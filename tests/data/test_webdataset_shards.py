"""Pretraining data that never stops a run: img2dataset-style shards (webdataset.TarWriter), streamed
over HTTP / pipe: / gzip, bad samples skipped and counted per shard, the shard index."""
import functools
import http.server
import io
import json
import re
import threading
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from beit3.data.datasets import BadSampleWarning
from beit3.data.index import DataError
from beit3.data.streams import (
    INDEX_FILE,
    PositionTracker,
    SampleStream,
    ShardRefs,
    TarShards,
    TextFiles,
    split_meta,
)

wds = pytest.importorskip("webdataset")


def jpeg(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 10, 20)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_img2dataset_shard(path: Path, first: int, count: int, bad: dict | None = None) -> list[str]:
    """A shard as img2dataset writes it: ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample.
    ``bad`` maps a sample number to a replacement of some of its members (None drops the member)."""
    keys = []
    with wds.TarWriter(str(path)) as writer:
        for n in range(first, first + count):
            key = f"{n:09d}"
            sample = {"__key__": key, "jpg": jpeg(n % 256), "txt": f"a photo number {n}",
                      "json": {"key": key, "status": "success", "width": 8, "height": 8}}
            for member, value in (bad or {}).get(n, {}).items():
                if value is None:
                    sample.pop(member)
                else:
                    sample[member] = value
            writer.write(sample)
            keys.append(key)
    return keys


BAD = {1: {"jpg": b"not an image"}, 3: {"txt": None}, 5: {"txt": ""}, 7: {"jpg": jpeg(7, 64)[:200]}}
"""An undecodable image, a pair without .txt, an empty caption, a truncated JPEG."""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three shards (one with bad samples) in a folder served by a loopback HTTP server."""
    root = tmp_path_factory.mktemp("shards")
    keys = []
    for shard in range(3):
        keys += write_img2dataset_shard(root / f"pairs-{shard:06d}.tar", shard * 10, 10, BAD if shard == 0 else None)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", keys
    finally:
        server.shutdown()
        server.server_close()


def good_keys(keys):
    return [k for k in keys if int(k) not in BAD]


def test_http_shards_stream_with_bad_samples_skipped_and_counted_per_shard(served):
    root, url, keys = served
    stream = SampleStream(TarShards(f"{url}/pairs-{{000000..000002}}.tar"), fields=("image", "text"),
                          shuffle_buffer=0)
    with pytest.warns(BadSampleWarning) as caught:
        samples = list(stream)
    assert sorted(s["__key__"] for s in samples) == good_keys(keys)  # shards in a seeded order
    assert samples[0]["json"]["status"] == "success" and samples[0]["image"].size == (8, 8)
    assert stream.skipped == 4 and stream.skipped_by_shard == Counter({f"{url}/pairs-000000.tar": 4})
    messages = " ".join(str(w.message) for w in caught)
    assert f"{url}/pairs-000000.tar:000000003 has no text" in messages
    assert f"{url}/pairs-000000.tar:000000005 has an empty text" in messages


@pytest.mark.parametrize("workers", [0, 2])
def test_mixing_loader_counts_what_its_workers_skipped_and_keeps_it_across_resume(served, workers):
    """Each worker's stream skips in its own process; the counts travel with the batches, so the
    loader in the main process reports them per kind and shard, and its state carries them on."""
    from beit3.data.mixing import MixingLoader

    root, _, _ = served
    shards = str(root / "pairs-{000000..000002}.tar")

    def loader():
        return MixingLoader({"pairs": SampleStream(TarShards(shards), fields=("image", "text"), shuffle_buffer=0)},
                            batch_size=2, num_workers=workers)

    first = loader()
    with warnings.catch_warnings():  # workers warn in their own processes, where pytest.warns cannot see
        warnings.simplefilter("ignore", BadSampleWarning)
        batches = list(first)  # one pass: 26 good pairs, 4 bad ones in the first shard
    assert sum(len(b["pairs"]) for b in batches) == 26
    bad_shard = str(root / "pairs-000000.tar")
    assert first.skipped_samples() == {"pairs": {bad_shard: 4}}
    second = loader()
    second.load_state_dict(first.state_dict())
    assert second.skipped_samples() == {"pairs": {bad_shard: 4}}


def test_strict_raises_naming_shard_and_key(served):
    _, url, _ = served
    stream = SampleStream(TarShards(f"{url}/pairs-000000.tar"), fields=("image", "text"), shuffle_buffer=0,
                          strict=True)
    with pytest.raises(DataError, match=r"pairs-000000\.tar:000000001"):
        list(stream)


def test_tar_gz_and_pipe_shards_read_as_streams(served, tmp_path):
    root, _, keys = served
    gz = tmp_path / "pairs-000000.tar.gz"
    write_img2dataset_shard(gz, 100, 4)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"  # really gzip
    got = [s["__key__"] for s in SampleStream(TarShards([str(gz), f"pipe:cat {root / 'pairs-000001.tar'}"]),
                                               fields=("image", "text"), shuffle_buffer=0)]
    assert sorted(got) == keys[10:20] + [f"{n:09d}" for n in range(100, 104)]


def test_a_shard_that_breaks_off_ends_there_and_the_run_goes_on(served, tmp_path):
    root, url, keys = served
    data = (root / "pairs-000002.tar").read_bytes()
    (root / "cut.tar.gz").write_bytes(b"")  # a vanished / empty download
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    stream = SampleStream(TarShards([f"{url}/pairs-000001.tar", f"{url}/missing.tar", f"pipe:cat {cut}"]),
                          fields=("image", "text"), shuffle_buffer=0)
    with pytest.warns(BadSampleWarning, match="cannot be read further"):
        got = [s["__key__"] for s in stream]
    whole, partial = [k for k in got if k in keys[10:20]], [k for k in got if k in keys[20:30]]
    assert sorted(whole) == keys[10:20] and 0 < len(partial) < 10 and partial == keys[20:20 + len(partial)]
    assert stream.skipped_by_shard[f"{url}/missing.tar"] == 1 and stream.skipped_by_shard[f"pipe:cat {cut}"] == 1


def test_streamed_resume_continues_exactly(served):
    _, url, _ = served

    def stream():
        return SampleStream(TarShards(f"{url}/pairs-{{000001..000002}}.tar"), fields=("image", "text"),
                            shuffle_buffer=6, seed=4, infinite=True)

    full = [s["__key__"] for _, s in zip(range(30), stream())]
    tracker, first = PositionTracker(), []
    for _, sample in zip(range(9), stream()):
        first.append(sample["__key__"])
        tracker.update(split_meta([sample])[1], slots=1)
    resumed = stream()
    resumed.load_state_dict(tracker.state_dict())
    assert first + [s["__key__"] for _, s in zip(range(21), resumed)] == full


def test_shard_index_is_written_once_and_then_no_header_is_read(served, tmp_path, monkeypatch):
    root, _, keys = served
    for shard in range(3):
        (tmp_path / f"p-{shard}.tar").write_bytes((root / f"pairs-{shard:06d}.tar").read_bytes())
    refs = ShardRefs(TarShards(str(tmp_path)))
    assert len(refs) == 30 and refs[12].key == keys[12] and refs.shard_of(25).endswith("p-2.tar")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert {name: entry["samples"] for name, entry in index["shards"].items()} == {"p-0.tar": 10, "p-1.tar": 10,
                                                                                  "p-2.tar": 10}
    import beit3.data.streams as streams

    def no_headers(shard):
        raise AssertionError(f"read the headers of {shard}")

    monkeypatch.setattr(streams, "_local_refs", no_headers)
    assert len(ShardRefs(TarShards(str(tmp_path)))) == 30  # from the index alone
    # a changed shard is counted again
    (tmp_path / "p-1.tar").write_bytes((root / "pairs-000001.tar").read_bytes()[:-10240] + b"\0" * 10240)
    with pytest.raises(AssertionError, match="p-1.tar"):
        ShardRefs(TarShards(str(tmp_path)))


def test_data_shards_command_writes_the_index_a_run_then_reads(served, tmp_path, monkeypatch):
    from tests.faults import assert_one_line_error, run_cli

    root, _, _ = served
    for shard in range(3):
        (tmp_path / f"s-{shard:03d}.tar").write_bytes((root / f"pairs-{shard:06d}.tar").read_bytes())
    code, out, err = run_cli(["data", "shards", str(tmp_path / "s-{000..002}.tar")])
    assert code == 0, err
    assert "3 shards, 30 samples" in out and INDEX_FILE in out
    assert set(json.loads((tmp_path / INDEX_FILE).read_text())["shards"]) == {"s-000.tar", "s-001.tar", "s-002.tar"}
    import beit3.data.streams as streams

    monkeypatch.setattr(streams, "_local_refs", lambda shard: pytest.fail(f"read the headers of {shard}"))
    assert len(ShardRefs(TarShards(str(tmp_path)))) == 30
    code, _, err = run_cli(["data", "shards", str(tmp_path / "nothing-*.tar")])
    assert_one_line_error(code, err, "no shard matches")
    code, _, err = run_cli(["data", "shards", str(tmp_path / "s-000.tar"), str(tmp_path / "gone.tar")])
    assert_one_line_error(code, err, "gone.tar")


def test_texts_given_tar_shards_is_a_clear_error(served):
    root, _, _ = served
    with pytest.raises(DataError, match="pairs-000000.tar is a tar shard, but texts are read from plain text"):
        TextFiles(str(root / "pairs-*.tar"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pretraining_run_skips_bad_pairs_and_reports_them(tmp_path, monkeypatch, capsys):
    """A pairs shard full of bad samples (and an oversized image) does not stop `beit3 pretrain`: the
    counts reach metrics.jsonl and summary.json; data.strict=true stops at the first, naming it."""
    from beit3.cli import main
    from beit3.data.synthetic import world
    from beit3.pretraining.teachers import HOGTeacher
    from beit3.pretraining.vqkd import VQKDConfig
    from beit3.pretraining.vqkd_training import train_visual_tokenizer

    root = tmp_path / "world"
    size = world.WorldSize(coco_train=1, coco_val=1, vqa_test=1, questions_per_image=1, flickr=1, nlvr2_train=1,
                           nlvr2_eval=1, class_train=1, class_val=1, detection_train=1, detection_val=1,
                           pretrain_pairs=16, pretrain_images=24, pretrain_texts=48, shards=1, rest_val_images=1)
    world.generate(root, size=size, image_size=32, build_indexes=False)
    images = TarShards(str(root / "pretrain/images/*.tar"))
    refs = [ref for unit in images.units() for ref in images.refs(unit)]
    train_visual_tokenizer(refs, images.load, VQKDConfig.tiny(codebook_size=16), HOGTeacher(8), steps=1,
                           batch_size=8, lr=1e-3, log_every=0).save_pretrained(root / "vqkd")
    bomb = io.BytesIO()
    Image.new("RGB", (40, 40)).save(bomb, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 pixels > 2 x 700 > 32 x 32: a bomb
    bad = dict(BAD)
    bad.update({n: {"txt": None} for n in range(8, 30)})
    bad[9] = {"jpg": None, "png": bomb.getvalue()}
    shard = root / "pretrain/pairs/aaa-bad.tar"
    write_img2dataset_shard(shard, 0, 30, {**bad, 0: {"txt": None}})
    args = ["pretrain", "--recipe", str(Path(__file__).resolve().parents[2] / "configs/pretrain_tiny.yaml"),
            f"data.root={root}", "task.options.visual_tokenizer=vqkd", "task.options.tokenizer=null",
            "task.options.text_vocab_size=48", "task.options.val_size=4", "data.batch_size=8",
            "schedule.max_steps=2", "schedule.warmup_steps=1", "train.eval_every=100",
            "train.checkpoint_every=null", "train.log_every=1"]
    with pytest.warns(BadSampleWarning):
        assert main([*args, "--output-dir", str(tmp_path / "run")]) == 0
    train = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert train[-1]["skipped_pairs"] > 0 and train[-1]["skipped_images"] == train[-1]["skipped_texts"] == 0
    assert train[-1]["skipped_pairs"] >= train[0]["skipped_pairs"]  # running totals
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["data_skipped"]["pairs"] == {str(shard): train[-1]["skipped_pairs"]}
    assert summary["data_skipped"]["images"] == {} and summary["data_skipped"]["texts"] == {}
    capsys.readouterr()
    assert main([*args, "data.strict=true", "--output-dir", str(tmp_path / "strict")]) != 0
    assert re.search(r"error: pretraining pairs: \S*aaa-bad\.tar:0000000\d\d has no text .*data\.strict=true",
                     capsys.readouterr().err)
