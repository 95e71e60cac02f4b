"""Failures of `beit3 finetune` / `pretrain` end in one clear line and leave earlier results intact
(issue 21: full disk, read-only folder, a second run into a used folder, resumed metrics, progress
in a log file, file modes, run.yaml paths, thread count). All on the toy task, about a second each."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import TINY

from beit3.training import checkpoint as ckpt
from tests.faults import (
    assert_one_line_error,
    full_dir,
    no_space_writers,
    read_only_dir,
    run_cli,
    tree_snapshot,
)


def _finetune(out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["finetune", "--recipe", TINY, "--output-dir", out, "train.threads=1", *extra])


def _steps(run: Path, split: str = "train") -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["split"] == split]


# ------------------------------------------------------------------- item 3: a full disk
def test_a_full_disk_during_a_checkpoint_is_one_oserror_and_keeps_the_earlier_one(tmp_path):
    with full_dir(tmp_path, size="512k") as disk:
        root = disk / "checkpoints"
        small = {"w": torch.zeros(1000)}
        ckpt.save_checkpoint(root, 1, model_state=small, trainer_state={"step": 1, "m": torch.ones(1000)})
        before = tree_snapshot(root)
        big = {"w": torch.zeros(200_000)}  # 800 kB: more than the disk holds
        with pytest.raises(OSError) as caught:
            ckpt.save_checkpoint(root, 2, model_state=big, trainer_state={"step": 2, "m": torch.ones(200_000)})
        assert caught.value.filename == str(root / "step_00000002")
        assert "no space left on the device" in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained tracebacks
        assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # the temp folder is gone
        assert tree_snapshot(root) == before
        ckpt.verify_checkpoint(root / "step_00000001")
        # torch.save's own failure (a RuntimeError about "unexpected pos") is reported the same way
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 40_000))
        with pytest.raises(OSError, match="no space left on the device"):
            ckpt.save_checkpoint(root, 3, model_state=small, trainer_state={"step": 3, "m": torch.ones(50_000)})
        assert tree_snapshot(root) == before


def test_finetune_onto_a_full_disk_ends_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _finetune(out, "schedule.max_steps=4")[0] == 0
    before = tree_snapshot(out / "checkpoints")
    no_space_writers(monkeypatch)
    code, _, err = _finetune(out, "schedule.max_steps=8", "--resume", "auto")
    assert_one_line_error(code, err, str(out / "checkpoints" / "step_00000008"), "no space left on the device")
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert tree_snapshot(out / "checkpoints") == before


# -------------------------------------------------------------- item 2: a read-only folder
@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_a_read_only_run_folder_fails_at_the_start(command, tmp_path, monkeypatch):
    import toytask

    def never(*args, **kwargs):
        raise AssertionError("the task was built before the folder was checked")

    monkeypatch.setattr(toytask.ToyTask, "build_model", never)
    monkeypatch.setattr(toytask.ToyTask, "build_datasets", never)
    with read_only_dir(tmp_path) as folder:
        code, _, err = run_cli([command, "--recipe", TINY, "--output-dir", folder / "run"])
    assert_one_line_error(code, err, str(folder / "run"), "run folder")


def test_visual_tokenizer_training_into_a_read_only_folder_fails_at_the_start(tmp_path):
    (tmp_path / "images").mkdir()
    with read_only_dir(tmp_path) as folder:
        code, _, err = run_cli(["visual-tokenizer", "train", "--images", tmp_path / "images", "--out", folder / "vqkd"])
    assert_one_line_error(code, err, str(folder / "vqkd"), "output folder")


def test_resume_still_refuses_the_optimizer_state_of_other_parameters():
    saved = {"param_groups": [{"params": ["embed", "text_embed"]}, {"params": ["head"]}],
             "state": {"embed": {}, "head": {}}}
    assert ckpt.check_optimizer_state(["embed", "text_embed", "head"], saved) == ["text_embed"]
    with pytest.raises(ValueError, match="never held .*extra"):
        ckpt.check_optimizer_state(["embed", "text_embed", "head", "extra"], saved)
    with pytest.raises(ValueError, match="does not train .*text_embed"):
        ckpt.check_optimizer_state(["embed", "head"], saved)
    tied = {"param_groups": [{"params": ["embed", "text_embed", "head", "decoder"]}], "state": {"decoder": {}}}
    assert ckpt.check_optimizer_state(["embed", "text_embed", "head"], tied, {"decoder": "head"}) == ["embed", "text_embed"]
    with pytest.raises(ValueError, match="unnamed"):
        ckpt.check_optimizer_state(["embed", "text_embed", "head"], {**saved, "state": {**saved["state"], "x": {}}})


# ------------------------------------------------- item 8: a fresh run into a used folder
def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert _finetune(out, "schedule.max_steps=8")[0] == 0
    (out / "notes.txt").write_text("mine")
    before = tree_snapshot(out)
    code, _, err = _finetune(out, "schedule.max_steps=4")
    assert_one_line_error(code, err, str(out), "--resume auto", "--overwrite")
    assert tree_snapshot(out) == before

    code, _, err = _finetune(out, "schedule.max_steps=4", "--overwrite")
    assert code == 0, err
    assert _steps(out) == [1, 2, 3, 4]  # only this run's records
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000004"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "notes.txt").read_text() == "mine"  # not a file of the run: left alone
    # and --resume auto now continues the new run, not the old one
    assert _finetune(out, "schedule.max_steps=6", "--resume", "auto")[0] == 0
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    code, _, err = _finetune(out, "--resume", "auto", "--overwrite")
    assert_one_line_error(code, err, "--resume", "--overwrite")


# -------------------------------------------- item 11: a resumed run's metrics.jsonl
def test_resuming_cuts_metrics_back_to_the_checkpoint_step(tmp_path):
    out = tmp_path / "run"
    assert _finetune(out, "schedule.max_steps=8", "train.eval_every=2")[0] == 0
    # as if killed after step 8 was logged but before its checkpoint was written
    for name in ("final", "summary.json"):
        path = out / name
        ckpt.shutil.rmtree(path) if path.is_dir() else path.unlink()
    ckpt.shutil.rmtree(out / "checkpoints" / "step_00000008")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"split": "train", "st')  # the half line a kill can leave
    assert _finetune(out, "schedule.max_steps=8", "train.eval_every=2", "--resume", "auto")[0] == 0
    assert _steps(out) == list(range(1, 9))
    assert _steps(out, "val") == [2, 4, 6, 8]
    # resume=auto with no checkpoint at all starts over, with a fresh file
    ckpt.shutil.rmtree(out / "checkpoints")
    assert _finetune(out, "schedule.max_steps=3", "--resume", "auto")[0] == 0
    assert _steps(out) == [1, 2, 3]


# ------------------------------------- item 17: --print-config validates like the run
def test_print_config_refuses_what_the_run_refuses(tmp_path, capsys):
    code, out, err = run_cli(["finetune", "--recipe", TINY, "task.options.trian_size=8", "--print-config"])
    assert_one_line_error(code, err, "trian_size")
    assert out == ""
    code, out, _ = run_cli(["finetune", "--recipe", TINY, "task.options.train_size=8", "--print-config"])
    assert code == 0 and "train_size: 8" in out


# -------------------------------------- item 18: progress into a log file, not a bar
def test_progress_into_a_non_terminal_is_plain_lines(tmp_path):
    code, _, err = _finetune(tmp_path / "run", "train.progress_bar=true")
    assert code == 0, err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if " step " in line and "/16 (" in line]
    assert lines and lines[-1].split(" step ")[1].startswith("16/16 (100%) loss=")
    assert len(lines) <= 2  # one per 30 s, and the last step


# --------------------------------------- item 19: file modes and run.yaml paths
def test_checkpoint_files_get_the_default_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        assert _finetune(tmp_path / "run", "schedule.max_steps=4")[0] == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_run_yaml_keeps_absolute_paths(tmp_path, monkeypatch):
    import yaml

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = _finetune(Path("run"), "schedule.max_steps=2", "data.root=data", "task.options.dim=8")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert saved["train"]["output_dir"] == str(tmp_path / "run")
    assert saved["data"]["root"] == str(tmp_path / "data")
    in_checkpoint = yaml.safe_load((tmp_path / "run" / "checkpoints" / "step_00000002" / "run.yaml").read_text())
    assert in_checkpoint["data"]["root"] == str(tmp_path / "data")


def test_resolve_paths_leaves_paths_under_data_root(tmp_path):
    from beit3.training.config import load_config, resolve_paths

    (tmp_path / "root" / "tokenizer").mkdir(parents=True)
    (tmp_path / "spm.model").write_text("x")
    cfg = load_config(TINY, ["data.root=root", "task.options.tokenizer=tokenizer", "model.pretrained=ckpt"])
    resolve_paths(cfg, cwd=tmp_path)
    assert cfg.data.root == str(tmp_path / "root") and cfg.model.pretrained == str(tmp_path / "ckpt")
    assert cfg.task.options["tokenizer"] == "tokenizer"  # read under data.root, which is now absolute
    cfg = load_config(TINY, ["task.options.tokenizer=spm.model", "train.resume=auto"])
    resolve_paths(cfg, cwd=tmp_path)
    assert cfg.task.options["tokenizer"] == str(tmp_path / "spm.model") and cfg.train.resume == "auto"


# ----------------------------------------------------------- item 20: thread count
def test_threads_default_to_the_cores_shared_by_the_local_processes(monkeypatch):
    from beit3.training import distributed as D

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(D, "_TORCH_DEFAULT_THREADS", 8)
    assert D.default_threads(1) == 8 and D.default_threads(2) == 4 and D.default_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert D.default_threads(2) == 3
    before = torch.get_num_threads()
    try:
        assert D.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
