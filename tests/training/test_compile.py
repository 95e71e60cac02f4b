"""`train.compile`: every block compiled by `torch.compile`, same losses (issue 23, item 2).

Inductor on CPU takes tens of seconds per graph with a cold cache (as on CI), so the default runs
use the ``aot_eager`` backend, which traces the same forward and backward graphs through Dynamo and
AOTAutograd without generating kernels: the engine on the toy task, and a few steps of a one-block
BEiT-3 with activation checkpointing (the combination whose hooks Dynamo cannot trace inside a
block). With ``BEIT3_INDUCTOR_TESTS=1`` the engine run uses Inductor and a 2-process DDP run with
compile is added (~1-2 min on 2 cores).
Tolerance: 1e-5 on losses of order 1 (the compiled kernels fuse and reorder float32 sums; the
observed differences are ~1e-7).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY, run_cli, train_losses

from beit3.config import Beit3Config
from beit3.layers import checkpoint_blocks
from beit3.models import Beit3ForVisualQuestionAnswering
from beit3.training import Trainer, build_task, load_config
from beit3.training import distributed as D

TOLERANCE = 1e-5
SHORT = ["schedule.max_steps=4", "train.eval_every=100", "task.options.val_size=0", "train.checkpoint_every=100"]


INDUCTOR = os.environ.get("BEIT3_INDUCTOR_TESTS") == "1"


@pytest.fixture
def cheap_backend(monkeypatch):
    """The engine's compile with ``aot_eager`` unless Inductor tests are asked for."""
    if not INDUCTOR:
        original = D.apply_compile
        monkeypatch.setattr(D, "apply_compile", lambda blocks: original(blocks, backend="aot_eager"))


def _fit(tmp_path, name, *overrides):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / name}", *SHORT, *overrides])
    trainer = Trainer(cfg, build_task(cfg))
    result = trainer.fit()
    return trainer, result, train_losses(tmp_path / name)


def test_compiled_engine_run_matches_the_eager_run(tmp_path, cheap_backend):
    torch._dynamo.reset()
    plain, _, eager = _fit(tmp_path, "eager")
    trainer, result, compiled = _fit(tmp_path, "compiled", "train.compile=true")
    assert result.step == 4 and sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    assert [compiled[s] for s in sorted(compiled)] == pytest.approx([eager[s] for s in sorted(eager)], abs=TOLERANCE)
    # every block was compiled in place: parameter names, and so checkpoints, are unchanged
    blocks = D.find_blocks(trainer.raw_model, None)
    assert blocks and all(getattr(block, "_beit3_compiled", False) for block in blocks)
    assert list(trainer.raw_model.state_dict()) == list(plain.raw_model.state_dict())
    torch._dynamo.reset()


def test_compile_field_is_validated(tmp_path):
    assert load_config(TINY, []).train.compile is False
    with pytest.raises((TypeError, ValueError), match="train.compile"):
        load_config(TINY, ["train.compile=3"])


@pytest.mark.skipif(not INDUCTOR, reason="~50 s (each process compiles with Inductor); BEIT3_INDUCTOR_TESTS=1 runs it")
def test_two_process_ddp_with_compile(tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(2, "finetune", "--recipe", str(TINY), f"train.output_dir={out}", "parallel.strategy=ddp",
                   "train.compile=true", *SHORT, timeout=300)
    assert "ddp x2 on cpu" in proc.stderr
    _, _, la = _fit(tmp_path, "single")  # eager, one process
    lb = train_losses(out)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(la)], abs=TOLERANCE)


def test_compiled_beit3_blocks_with_activation_checkpointing_match_eager():
    config = Beit3Config.from_preset("tiny", vocab_size=50, num_layers=1)
    g = torch.Generator().manual_seed(0)
    pixels, ids = torch.rand(2, 3, 32, 32, generator=g), torch.randint(3, 49, (2, 8), generator=g)
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, 5:] = 0
    labels = torch.rand(2, 5, generator=g)

    def losses(compile: bool) -> list[float]:
        torch.manual_seed(0)
        model = Beit3ForVisualQuestionAnswering(config, num_labels=5).train()
        blocks = D.find_blocks(model, None)
        checkpoint_blocks(blocks)
        if compile:
            D.apply_compile(blocks, backend="aot_eager")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(3):
            loss = model(pixels, ids, padding, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    torch._dynamo.reset()
    try:
        eager, compiled = losses(False), losses(True)
    finally:
        torch._dynamo.reset()
    assert compiled == pytest.approx(eager, abs=TOLERANCE)
    assert eager[-1] < eager[0]  # it trained
