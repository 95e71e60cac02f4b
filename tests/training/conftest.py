"""Helpers for engine tests: run the CLI in-process or under torchrun, read run outputs."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_pipelines import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = HERE / "tiny.yaml"

sys.path.insert(0, str(HERE))  # makes `toytask:make` importable in-process


def cli_command(nproc: int, *args: str) -> list[str]:
    """The training CLI as one process, or as `nproc` gloo processes under torchrun."""
    launch = str(HERE / "launch.py")
    if nproc == 1:
        return [sys.executable, launch, *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), launch, *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_command(nproc, *args), env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"training exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (from /proc)."""
    found, todo = [], [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in children.read_text().split()]
                found += kids
                todo += kids
    return found


def kill_when_exists(command: list[str], path: Path, log_file: Path, timeout: float = 150) -> None:
    """Start ``command`` (stderr to ``log_file``) and SIGKILL it and every process it started (torchrun
    and its workers, at once) as soon as ``path`` exists."""
    with open(log_file, "w") as log_handle:
        proc = subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_handle)
    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"training exited before it could be killed: {log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{path} did not appear"
            time.sleep(0.02)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run's later record for a step wins."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train" and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses
