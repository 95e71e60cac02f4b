"""`beit3 pretrain` at scale: streamed shards (HTTP, .tar.gz) with bad samples, resumed exactly; a
2-process FSDP2 run with sharded checkpoints killed with SIGKILL and resumed on 1 process."""
import functools
import gzip
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_command, kill_when_exists, train_losses
from PIL import Image
from safetensors.torch import load_file

from beit3.data import TarShards
from beit3.data.datasets import BadSampleWarning
from beit3.data.synthetic import world
from beit3.pretraining.data import collect_refs
from beit3.pretraining.teachers import HOGTeacher
from beit3.pretraining.vqkd import VQKDConfig
from beit3.pretraining.vqkd_training import train_visual_tokenizer
from beit3.processing import train_tokenizer

wds = pytest.importorskip("webdataset")

RECIPE = REPO / "configs" / "pretrain_tiny.yaml"
SIZE = world.WorldSize(coco_train=1, coco_val=1, vqa_test=1, questions_per_image=1, flickr=1, nlvr2_train=1,
                       nlvr2_eval=1, class_train=1, class_val=1, detection_train=1, detection_val=1,
                       pretrain_pairs=48, pretrain_images=48, pretrain_texts=96, shards=2, rest_val_images=1)
BAD = {1: {"jpg": b"not an image"}, 3: {"txt": None}, 5: {"txt": ""}, 7: {"jpg": None}, 9: {"txt": None}}
"""An undecodable image, a pair without .txt, an empty caption, a pair without an image, another."""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _jpeg(value):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 40, 200 - value)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic pretraining world with a visual and a text tokenizer; its images shards also
    gzipped; a bad img2dataset-style pairs shard; the folder served over loopback HTTP."""
    root = tmp_path_factory.mktemp("world")
    world.generate(root, size=SIZE, image_size=32, build_indexes=False)
    images = TarShards(str(root / "pretrain/images/*.tar"))
    train_visual_tokenizer(collect_refs(images), images.load, VQKDConfig.tiny(codebook_size=32), HOGTeacher(8),
                           steps=2, batch_size=16, lr=1e-3, log_every=0).save_pretrained(root / "vqkd")
    train_tokenizer([root / "pretrain/texts.txt"], 64, progress=False, num_threads=1).save_pretrained(root / "tok")
    (root / "gz").mkdir()
    for shard in images.shards:
        (root / "gz" / (Path(shard).name + ".gz")).write_bytes(gzip.compress(Path(shard).read_bytes()))
    (root / "bad").mkdir()
    with wds.TarWriter(str(root / "bad/pairs-bad.tar")) as writer:  # as img2dataset writes: jpg, txt, json
        for n in range(20):
            sample = {"__key__": f"{n:09d}", "jpg": _jpeg(n * 9), "txt": f"a photo number {n}",
                      "json": {"key": f"{n:09d}", "status": "success"}}
            for member, value in BAD.get(n, {}).items():
                sample.pop(member) if value is None else sample.__setitem__(member, value)
            writer.write(sample)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _common(root, out, *overrides):
    return ["pretrain", "--recipe", str(RECIPE), "--output-dir", str(out), f"data.root={root}",
            "task.options.visual_tokenizer=vqkd", f"task.options.tokenizer={root / 'tok'}", "train.precision=fp32",
            "train.log_every=1", "train.keep_last=10", "schedule.warmup_steps=2", *overrides]


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_streamed_http_and_gzip_shards_train_skip_bad_pairs_and_resume_exactly(data, tmp_path):
    """Images from .tar.gz shards, pairs over HTTP (one shard with bad samples): the run trains, counts
    the bad pairs under their URL, and a run resumed from its step-5 checkpoint continues it exactly."""
    from beit3.cli import main

    root, url = data
    images = sorted(str(path) for path in (root / "gz").glob("*.tar.gz"))
    pairs = [f"{url}/pretrain/pairs/{path.name}" for path in sorted((root / "pretrain/pairs").glob("*.tar"))]
    pairs.append(f"{url}/bad/pairs-bad.tar")
    args = ["task.options.images=" + json.dumps(images), "task.options.pairs=" + json.dumps(pairs),
            "task.options.val_size=4", "task.options.shuffle_buffer=8", "data.batch_size=8",
            "schedule.max_steps=10", "train.eval_every=10", "train.checkpoint_every=5"]
    run = tmp_path / "run"
    with pytest.warns(BadSampleWarning):
        assert main(_common(root, run, *args)) == 0
    summary = json.loads((run / "summary.json").read_text())
    # 10 steps x 8 pairs = 80 > the 60 good training pairs of an epoch: every bad one has been met.
    assert summary["data_skipped"]["pairs"] == {f"{url}/bad/pairs-bad.tar": len(BAD)}
    assert summary["data_skipped"]["images"] == {} and summary["data_skipped"]["texts"] == {}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 11))
    val = [r for r in records if r["split"] == "val"][-1]
    assert val["pair_mlm_acc"] >= 0 and val["image_mim_loss"] > 0
    assert records[-2]["skipped_pairs"] == len(BAD)

    resumed = tmp_path / "resumed"
    assert main(_common(root, resumed, *args, f"train.resume={run / 'checkpoints/step_00000005'}")) == 0
    reference, continued = train_losses(run), train_losses(resumed)
    assert sorted(continued) == list(range(6, 11))
    assert [continued[s] for s in range(6, 11)] == [reference[s] for s in range(6, 11)]
    assert json.loads((resumed / "summary.json").read_text())["data_skipped"] == summary["data_skipped"]
    final, again = _weights(run), _weights(resumed)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_streamed_pretraining_needs_max_steps(data, tmp_path, capsys):
    from beit3.cli import main

    root, url = data
    status = main(_common(root, tmp_path / "run", f"task.options.pairs={url}/bad/pairs-bad.tar",
                          "task.options.val_size=2", "schedule.max_steps=null", "schedule.epochs=1"))
    assert status != 0 and "streamed and have no length: set schedule.max_steps" in capsys.readouterr().err


TOLERANCE = 5e-5
"""1 process with 2 micro-batches of 2 against 2 FSDP2 processes with 2 each: the same per-micro-batch
means, summed in another order (the engine's 1-vs-2-process bound)."""


def test_two_fsdp_processes_killed_mid_pretraining_resume_on_one(data, tmp_path):
    """2-process FSDP2 pretraining with sharded checkpoints is SIGKILLed once its step-4 checkpoint is in
    place; ``--resume auto`` on 1 process continues it: the same losses and weights (to rounding) as an
    uninterrupted 1-process run, because the samples, masks and crops depend on the data position only."""
    from beit3.cli import main

    root, _ = data
    args = ["task.options.val_size=4", "data.batch_size=4", "data.micro_batch_size=2", "schedule.max_steps=16",
            "train.eval_every=100", "train.checkpoint_every=4", "train.checkpoint_format=sharded"]
    reference = tmp_path / "reference"
    assert main(_common(root, reference, *args)) == 0

    two = tmp_path / "two"
    command = cli_command(2, *_common(root, two, *args, "parallel.strategy=fsdp"))
    log_file = tmp_path / "two.log"
    kill_when_exists(command, two / "checkpoints" / "step_00000004", log_file, timeout=240)
    assert "fsdp x2" in log_file.read_text()
    assert not (two / "final").exists() and max(train_losses(two)) < 16
    newest = max(int(p.name.split("_")[1]) for p in (two / "checkpoints").glob("step_*") if "tmp" not in p.name)

    assert main(_common(root, two, *args, "train.resume=auto")) == 0
    summary = json.loads((two / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["steps_this_run"] == 16 - newest
    assert not list((two / "checkpoints").glob("*.tmp-*"))
    la, lb = train_losses(reference), train_losses(two)
    assert sorted(lb) == list(range(1, 17))
    assert [lb[s] for s in range(1, 17)] == pytest.approx([la[s] for s in range(1, 17)], abs=TOLERANCE)
    wa, wb = _weights(reference), _weights(two)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=TOLERANCE, rtol=0, msg=name)
    shutil.rmtree(two / "checkpoints")


def test_a_stream_resumed_in_another_layout_restarts_the_saved_epoch(data):
    """Saved with 1 loader slot, resumed with 2 workers (2 slots): the positions cannot be carried over,
    so each source starts its saved epoch again in the new layout, and says so."""
    from beit3.data import TextFiles
    from beit3.pretraining.data import MaskedDataModelingStream, MaskedSamples
    from beit3.processing import Beit3Tokenizer

    root, _ = data
    sources = {"images": TarShards(str(root / "pretrain/images/*.tar")),
               "texts": TextFiles(str(root / "pretrain/texts.txt")),
               "pairs": TarShards(str(root / "pretrain/pairs/*.tar"))}
    samples = MaskedSamples(Beit3Tokenizer.from_pretrained(root / "tok"), image_size=32, patch_size=8)
    stream = MaskedDataModelingStream(sources, samples, seed=1, shuffle_buffer=4)
    batches = stream.batches(2)
    for _ in range(3):
        batch = next(batches)
    assert batch["image_pixel_values"].shape == (2, 3, 32, 32) and batch["text_input_ids"].shape[0] == 2
    state = stream.state_dict()
    assert state["pairs"]["slots"] == 1 and state["pairs"]["positions"] == {"0": [0, 5]}

    same = MaskedDataModelingStream(sources, samples, seed=1, shuffle_buffer=4)
    same.load_state_dict([state])
    after = next(same.batches(2))
    expected = next(batches)  # the uninterrupted stream's 4th batch, masks and crops included
    assert all(torch.equal(after[k], expected[k]) for k in expected if isinstance(expected[k], torch.Tensor))

    other = MaskedDataModelingStream(sources, samples, seed=1, shuffle_buffer=4)
    other.load_state_dict([state])
    with pytest.warns(UserWarning, match="saved with 1 loader slots .* this run has 2; starting epoch 0"):
        batch = next(other.batches(2, num_workers=2))
    assert batch["pair_pixel_values"].shape == (2, 3, 32, 32)
