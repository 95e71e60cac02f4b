"""In-process runs of the engine on the toy task (one process, CPU)."""
import json
import os
import signal

import pytest
import torch
from conftest import TINY, train_losses
from safetensors.torch import load_file

from beit3.training import Trainer, build_task, load_config
from toytask import ToyTask


def _fit(tmp_path, *overrides, name="run", task=None):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / name}", *overrides])
    result = Trainer(cfg, task or build_task(cfg)).fit()
    return result, tmp_path / name


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_runs_are_deterministic_and_write_all_outputs(tmp_path):
    result_a, a = _fit(tmp_path, name="a")
    result_b, b = _fit(tmp_path, name="b")
    assert result_a.stop_reason == "completed" and result_a.step == 16
    assert train_losses(a) == train_losses(b)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = train_losses(a)
    assert sorted(losses) == list(range(1, 17)) and losses[16] < losses[1]
    assert (a / "tensorboard").is_dir() and any((a / "tensorboard").iterdir())
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["samples_seen"] == 128
    records = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "pred_mean"} <= set(train[0])
    # The logged lr follows the schedule: warmup from 1e-3 to 1e-2 over 3 steps.
    assert [r["lr"] for r in train[:4]] == pytest.approx([1e-3, 4e-3, 7e-3, 1e-2])


def test_gradient_accumulation_matches_full_batch(tmp_path):
    _, full = _fit(tmp_path, name="full")
    _, accum = _fit(tmp_path, "data.micro_batch_size=2", name="accum")
    assert train_losses(accum) == pytest.approx(train_losses(full), rel=1e-5)
    wf, wa = _weights(full), _weights(accum)
    assert all(torch.allclose(wf[k], wa[k], atol=1e-6) for k in wf)


def test_best_checkpoint_follows_the_metric(tmp_path):
    _, run = _fit(tmp_path, "train.eval_every=2", "train.checkpoint_every=100", "train.keep_last=1")
    vals = {json.loads(l)["step"]: json.loads(l)["mse"]
            for l in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in l}
    assert sorted(vals) == [2, 4, 6, 8, 10, 12, 14, 16]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == min(vals, key=vals.get) and best["value"] == pytest.approx(min(vals.values()))
    assert (run / "checkpoints" / best["path"]).is_dir()


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    # Sample 5 is NaN: one batch per epoch contains it, so 2 of 16 updates are skipped.
    result, run = _fit(tmp_path, "task.options.nan_indices=[5]")
    assert result.stop_reason == "completed"
    assert result.summary["nonfinite_steps_skipped"] == 2
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r.get("nonfinite")) == 2
    assert all(torch.isfinite(t).all() for t in _weights(run).values())


def test_consecutive_nonfinite_losses_stop_with_a_checkpoint(tmp_path):
    result, run = _fit(tmp_path, f"task.options.nan_indices={list(range(64))}", "train.max_nonfinite_steps=3")
    assert result.stop_reason == "nonfinite" and result.step == 3
    assert result.last_checkpoint == run / "checkpoints" / "step_00000003"
    assert not (run / "final").exists()


class _SignalledTask(ToyTask):
    """Sends SIGTERM to its own process during step 5, as a cluster preemption would."""

    def train_step(self, model, batch, *, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(model, batch, step=step)


def test_sigterm_checkpoints_and_stops(tmp_path):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / 'run'}"])
    before = signal.getsignal(signal.SIGTERM)
    result = Trainer(cfg, _SignalledTask(cfg.task.options)).fit()
    assert result.stop_reason == "signal" and result.signal_number == signal.SIGTERM
    assert result.step == 6 and result.last_checkpoint.name == "step_00000006"
    assert signal.getsignal(signal.SIGTERM) == before


def test_ema_weights_are_exported(tmp_path):
    _, run = _fit(tmp_path, "optim.ema_decay=0.9")
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    ema, live, final = (load_file(str(newest / f)) for f in ("ema.safetensors", "model.safetensors", "../../final/model.safetensors"))
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    assert any(not torch.equal(live[k], ema[k]) for k in ema)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    result, run = _fit(tmp_path, f"train.precision={precision}", "schedule.max_steps=4")
    assert result.stop_reason == "completed" and result.step == 4
    assert all(v == v for v in train_losses(run).values())


def test_cli_print_config_and_errors(tmp_path, capsys):
    import argparse

    from beit3.training.commands import register

    parser = argparse.ArgumentParser(prog="beit3")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--recipe", str(TINY), "--print-config", "--resume", "auto", "optim.lr=0.5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "resume: auto" in out
    args = parser.parse_args(["finetune", "--recipe", str(TINY), "optim.lrr=0.5"])
    with pytest.raises(KeyError, match="optim.lrr"):
        args.func(args)
    args = parser.parse_args(["finetune", "--recipe", str(TINY), "--task", "no_such_task"])
    with pytest.raises(KeyError, match="unknown task 'no_such_task'"):
        args.func(args)


def test_warmup_longer_than_the_run_is_capped_at_its_length(tmp_path, caplog):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", "schedule.max_steps=3",
                             "schedule.warmup_steps=null", "schedule.warmup_epochs=50"])
    trainer = Trainer(cfg, build_task(cfg))
    with caplog.at_level("WARNING", logger="beit3.training"):
        trainer._setup()
    assert trainer.schedule.warmup_steps == trainer.total_steps == 3
    assert "longer than the run" in caplog.text


def test_train_fraction_trains_every_seed_and_rank_on_the_same_subset(tmp_path):
    from beit3.training.distributed import TrainSampler

    def seen(sampler, epochs=3):
        out = []
        for epoch in range(epochs):
            sampler.set_position(epoch)
            out.append(list(sampler))
        return out

    quarter = TrainSampler(100, 8, 0, 1, seed=0, fraction=0.25)
    assert quarter.num_samples == 25 and quarter.batches_per_epoch == 3
    subset = set(quarter.indices)
    epochs = seen(quarter)
    assert all(set(epoch) <= subset and len(set(epoch)) == 24 for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    other_seed = seen(TrainSampler(100, 8, 0, 1, seed=7, fraction=0.25))
    assert set(TrainSampler(100, 8, 0, 1, seed=7, fraction=0.25).indices) == subset and other_seed != epochs
    ranks = [seen(TrainSampler(100, 8, rank, 2, seed=0, fraction=0.25), 1)[0] for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(epochs[0])
    # the engine: epochs of the subset, and a clear error when it is smaller than one batch
    result, _ = _fit(tmp_path, "data.train_fraction=0.5", "schedule.epochs=1")
    assert result.step == 4  # 32 of the toy task's 64 samples, batch 8 (the whole set: 8 steps an epoch)
    with pytest.raises(ValueError, match="train_fraction"):
        _fit(tmp_path, "data.train_fraction=0.01", name="tiny")
    with pytest.raises(ValueError, match="train_fraction"):
        load_config(TINY, ["data.train_fraction=0"])
