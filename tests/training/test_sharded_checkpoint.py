"""Sharded (torch.distributed.checkpoint) checkpoints: resumed on another number of processes, the run
continues as if uninterrupted; consolidated into a from_pretrained folder; written atomically."""
import subprocess
import textwrap

import pytest
import torch
from conftest import REPO, TINY, cli_command, kill_when_exists, subprocess_env, train_losses
from safetensors.torch import load_file

from beit3.training import Trainer, build_task, load_config
from beit3.training import checkpoint as ckpt

OVERRIDES = ["train.checkpoint_format=sharded", "train.keep_last=10", "optim.ema_decay=0.9"]
SHARDED = ["finetune", "--recipe", str(TINY), *OVERRIDES]
TOLERANCE = 5e-5
"""Losses and weights: 2 processes sum gradients in another order than 1 (the FSDP test's bound)."""


def _final(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_continues(reference, resumed, first_step, atol=TOLERANCE):
    la, lb = train_losses(reference), train_losses(resumed)
    assert sorted(lb) == list(range(first_step, 17))
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(lb)], abs=atol)
    wa, wb = _final(reference), _final(resumed)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=0, msg=name)


def _fit_here(out, *overrides):
    """One process, in this one (no interpreter start-up)."""
    cfg = load_config(TINY, [f"train.output_dir={out}", *OVERRIDES, *overrides])
    return Trainer(cfg, build_task(cfg)).fit()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Uninterrupted 1-process run with sharded checkpoints (its final/, the EMA weights, is
    consolidated from the last one)."""
    out = tmp_path_factory.mktemp("one") / "run"
    _fit_here(out)
    return out


def test_sharded_checkpoint_folder_and_consolidate(one_process, tmp_path):
    step8 = one_process / "checkpoints" / "step_00000008"
    assert ckpt.is_sharded(step8) and not (step8 / "model.safetensors").exists()
    ckpt.verify_checkpoint(step8)  # the manifest covers the DCP files too
    assert any(name.startswith("sharded/") and name.endswith(".distcp")
               for name in __import__("json").loads((step8 / "manifest.json").read_text())["files"])
    assert not list((one_process / "checkpoints").glob("*.tmp-*"))
    step16 = one_process / "checkpoints" / "step_00000016"
    (step16 / "config.json").write_text('{"model_type": "toy"}')  # the toy model has no config of its own
    out = ckpt.consolidate(step16, tmp_path / "converted", ema=True)  # final/ holds the EMA weights
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    weights, final = load_file(str(out / "model.safetensors")), _final(one_process)
    assert sorted(weights) == sorted(final) and all(torch.equal(weights[k], final[k]) for k in final)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.consolidate(tmp_path, tmp_path / "x")


def test_resumed_on_two_fsdp_processes_killed_then_resumed_on_one_continues_the_run(one_process, tmp_path):
    """1 -> 2: the 1-process step-4 checkpoint resumed by 2 FSDP processes, which save their own shards
    and are SIGKILLed after step 8's; 2 -> 1: ``--resume auto`` on 1 process takes that checkpoint.
    The losses of steps 5-16 and the final weights are those of the uninterrupted run."""
    two = tmp_path / "two"
    command = cli_command(2, *SHARDED, f"train.output_dir={two}", "parallel.strategy=fsdp", "task.options.sleep=0.4",
                          f"train.resume={one_process / 'checkpoints' / 'step_00000004'}")
    log_file = tmp_path / "two.log"
    kill_when_exists(command, two / "checkpoints" / "step_00000008", log_file)
    log = log_file.read_text()
    assert "fsdp x2" in log and "RNG states for 1 processes, this run has 2" in log
    assert not (two / "final").exists() and max(train_losses(two)) < 16
    result = _fit_here(two, "train.resume=auto")
    assert result.stop_reason == "completed" and result.summary["steps_this_run"] == 8  # from step 8
    assert not list((two / "checkpoints").glob("*.tmp-*"))
    _assert_continues(one_process, two, 5)


META_INIT = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from beit3.config import Beit3Config
    from beit3.models import Beit3ForPreTraining
    from beit3.training import distributed as D

    info = D.init_distributed()
    def build():
        return Beit3ForPreTraining(Beit3Config.from_preset("tiny"), visual_vocab_size=16)
    torch.manual_seed(7)
    eager = build()
    after_eager = torch.rand(4)
    torch.manual_seed(7)
    model = D.build_on_main(build, info)
    assert info.is_main or all(p.is_meta for p in model.parameters())
    full = dict(model.state_dict()) if info.is_main else None
    D.apply_fsdp(model, D.find_blocks(model, None), device=info.device, param_dtype=None,
                 reshard_after_forward=True)
    D.materialize_from_main(model, full, info.device)
    assert torch.equal(torch.rand(4), after_eager)  # the RNG continues as after an eager build
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    want = eager.state_dict()
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not torch.equal(got[k].cpu(), want[k])]
    assert not bad, bad
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[k], b) for k, b in eager.named_buffers())
    print(f"rank {info.rank} identical {len(want)}", flush=True)  # one write: ranks share the pipe
""")


def test_meta_device_build_gives_the_eager_weights(tmp_path):
    """parallel.meta_init: rank 1 builds on meta and gets its FSDP2 shards of rank 0's values."""
    script = tmp_path / "meta_init.py"
    script.write_text(META_INIT)
    command = cli_command(2, "x")[:-2] + [str(script)]  # torchrun ... <script>
    proc = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 identical" in proc.stdout and "rank 1 identical" in proc.stdout


def test_a_sharded_save_that_dies_leaves_no_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(2, 2)
    ckpt.save_sharded_checkpoint(tmp_path, 1, state={"model": model.state_dict()}, trainer_state={"step": 1})

    def dies(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(OSError, match="step_00000002"):
        ckpt.save_sharded_checkpoint(tmp_path, 2, state={"model": model.state_dict()}, trainer_state={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert ckpt.find_resumable(tmp_path) == tmp_path / "step_00000001"


def _weights(checkpoint, out):
    (checkpoint / "config.json").write_text('{"model_type": "toy"}')  # the toy model has no config of its own
    return load_file(str(ckpt.consolidate(checkpoint, out) / "model.safetensors"))


def test_async_checkpoints_hold_what_synchronous_ones_hold_and_resume_the_run(one_process, tmp_path, monkeypatch):
    """train.async_checkpoint: every checkpoint is written by DCP's background save (never the
    blocking one) and holds the weights the synchronous run's holds at that step, though training went
    on while it was written; resumed from one, the run continues as the uninterrupted one."""
    import torch.distributed.checkpoint as dcp

    calls = {"save": 0, "async_save": 0}
    for name in calls:
        real = getattr(dcp, name)
        monkeypatch.setattr(dcp, name, (lambda n, f: lambda *a, **k: calls.__setitem__(n, calls[n] + 1) or f(*a, **k))(name, real))
    out = tmp_path / "async"
    result = _fit_here(out, "train.async_checkpoint=true")
    assert result.stop_reason == "completed" and result.last_checkpoint.is_dir()
    assert calls == {"save": 0, "async_save": 4}  # steps 4, 8, 12, 16
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (one_process / "checkpoints").iterdir())
    assert not list((out / "checkpoints").glob("*.tmp-*"))
    for step in ("step_00000004", "step_00000012"):
        ckpt.verify_checkpoint(out / "checkpoints" / step)
        a = _weights(one_process / "checkpoints" / step, tmp_path / f"sync-{step}")
        b = _weights(out / "checkpoints" / step, tmp_path / f"async-{step}")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), step
    resumed = tmp_path / "resumed"
    monkeypatch.undo()
    _fit_here(resumed, "train.async_checkpoint=true", f"train.resume={out / 'checkpoints' / 'step_00000008'}")
    _assert_continues(one_process, resumed, 9, atol=0)


def test_an_async_save_that_fails_leaves_no_checkpoint_and_says_why(tmp_path, monkeypatch):
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(2, 2)
    first = ckpt.save_sharded_checkpoint(tmp_path, 1, state={"model": model.state_dict()}, trainer_state={"step": 1},
                                         asynchronous=True)
    assert first.wait() == tmp_path / "step_00000001" and first.done()

    def fails(*args, **kwargs):
        future = Future()
        future.set_exception(OSError(28, "No space left on device"))
        return future

    monkeypatch.setattr(dcp, "async_save", fails)
    pending = ckpt.save_sharded_checkpoint(tmp_path, 2, state={"model": model.state_dict()},
                                           trainer_state={"step": 2}, asynchronous=True)
    with pytest.raises(OSError, match="step_00000002"):
        pending.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert ckpt.find_resumable(tmp_path) == tmp_path / "step_00000001"


def test_async_checkpoint_needs_the_sharded_format():
    with pytest.raises(ValueError, match="async_checkpoint needs train.checkpoint_format=sharded"):
        load_config(TINY, ["train.async_checkpoint=true"]).validate()


def test_two_fsdp_processes_save_asynchronously_over_their_own_gloo_group(one_process, tmp_path):
    """The background writes of 2 processes meet over the checkpoint group while training runs FSDP's
    collectives on the default one; the run ends with every checkpoint in place and continues the
    1-process run (same losses and weights within the 1-vs-2-process bound)."""
    two = tmp_path / "two"
    done = subprocess.run(cli_command(2, *SHARDED, f"train.output_dir={two}", "parallel.strategy=fsdp",
                                      "train.async_checkpoint=true"),
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (one_process / "checkpoints").iterdir())
    assert not list((two / "checkpoints").glob("*.tmp-*"))
    ckpt.verify_checkpoint(two / "checkpoints" / "step_00000008")
    _assert_continues(one_process, two, 1)
