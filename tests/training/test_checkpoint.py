import json
import logging
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from beit3.training import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "b": torch.zeros(2)}


def _trainer_state(step: int) -> dict:
    return {"step": step, "optimizer": {"state": {"w": {"exp_avg": torch.ones(3, 2), "step": torch.tensor(5.0)}},
                                        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.98), "params": ["w"]}]},
            "rng": [ckpt.capture_rng_state()]}


def test_save_load_round_trip_with_weights_only(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, model_state=_state(1.0), trainer_state=_trainer_state(3),
                                ema_state=_state(0.5), text_files={"run.yaml": "a: 1\n"})
    assert path.name == "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "manifest.json", "model.safetensors", "run.yaml", "trainer_state.pt"]
    ckpt.verify_checkpoint(path)
    model, state, ema = ckpt.load_checkpoint(path)
    assert torch.equal(model["w"], torch.full((3, 2), 1.0)) and torch.equal(ema["w"], torch.full((3, 2), 0.5))
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, model_state={"a": shared, "b": shared, "c": shared[1:]},
                                trainer_state={"step": 1})
    model, _, _ = ckpt.load_checkpoint(path)
    assert torch.equal(model["b"], shared) and torch.equal(model["c"], shared[1:])


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.randn(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == expected


def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model_state=_state(step), trainer_state=_trainer_state(step))
    (tmp_path / "step_00000006" / "model.safetensors").write_bytes(b"garbage")
    data = bytearray((tmp_path / "step_00000004" / "trainer_state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits
    (tmp_path / "step_00000004" / "trainer_state.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="beit3.training"):
        found = ckpt.find_resumable(tmp_path)
    assert found == tmp_path / "step_00000002"
    assert "step_00000006" in caplog.text and "expected" in caplog.text
    assert "step_00000004" in caplog.text and "checksum" in caplog.text


def test_prune_keeps_last_k_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, step, model_state=_state(step), trainer_state={"step": step})
        if step == 2:
            ckpt.write_best(tmp_path, 2, "acc", 0.9)
    (tmp_path / "step_00000006.tmp-1").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "step_00000002", "step_00000004", "step_00000005"]
    assert json.loads((tmp_path / "best.json").read_text())["value"] == 0.9


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, model_state=_state(1.0), trainer_state={"step": 1})
    ckpt.save_checkpoint(tmp_path, 1, model_state=_state(2.0), trainer_state={"step": 1})
    model, _, _ = ckpt.load_checkpoint(tmp_path / "step_00000001")
    assert model["w"][0, 0] == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_sigkill_during_checkpoint_writing_leaves_previous_loadable(tmp_path):
    """A process saving 6 MB checkpoints in a loop is SIGKILLed at an arbitrary moment."""
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from beit3.training import checkpoint as ckpt
        root = Path({str(tmp_path)!r})
        for step in range(1, 10_000):
            weights = {{"w": torch.full((1536, 1024), float(step))}}
            ckpt.save_checkpoint(root, step, model_state=weights, trainer_state={{"step": step}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait until a few checkpoints are complete
            assert proc.stdout.readline(), "saver died"
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("*.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.001)  # kill while a checkpoint is being written
    finally:
        proc.kill()
        proc.wait(timeout=30)
    found = ckpt.find_resumable(tmp_path)
    assert found is not None
    model, state, _ = ckpt.load_checkpoint(found)
    assert torch.all(model["w"] == float(state["step"]))
    assert state["step"] >= 3
