"""Fault injection for command tests: read-only folders, a full disk, a killed process.

Every command that writes goes through these, so each failure a user meets ends in one clear line
(``beit3 <command>: error: <path>: <reason>``) and nothing saved before is damaged.

* ``read_only_dir(tmp_path, source=None)``: a folder (empty, or a copy) no file can be written in.
  ``chmod`` for ordinary users; as root a read-only bind mount; skipped where neither is possible.
* ``bomb_png(path, w, h)``: a decompression bomb's header.
* ``full_dir(tmp_path, size)``: a small tmpfs (root) that really fills up; elsewhere skipped; and
  ``no_space_writers(monkeypatch)``, which makes the package's writers fail with ENOSPC after
  writing part of their file, everywhere.
* ``run_cli(args)``: ``beit3.cli.main`` in-process, returning (exit code, stdout, stderr).
* ``kill_when(cmd, predicate)``: start a command, SIGKILL it as soon as ``predicate()`` holds.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest


def _mount_tmpfs(path: Path, options: str) -> bool:
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_dir(parent: Path, name: str = "read-only", source: Path | None = None) -> Iterator[Path]:
    """A folder in which nothing can be created or written: empty, or a copy of ``source``. ``chmod``
    for ordinary users; as root (who ignores permissions) a read-only bind mount of the folder."""
    path = Path(parent) / name
    if source is not None:
        shutil.copytree(source, path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("mount") is None or subprocess.run(["mount", "--bind", str(path), str(path)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder here (running as root and mount is not allowed)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount a folder read-only here")
        yield path
    finally:
        _umount(path)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG whose header claims width x height with (almost) no pixel data: a decompression
    bomb's header, written in microseconds."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@contextlib.contextmanager
def full_dir(parent: Path, size: str = "256k", name: str = "full") -> Iterator[Path]:
    """A folder on a file system of ``size`` bytes, so writing more fails with ENOSPC."""
    path = Path(parent) / name
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount_tmpfs(path, f"size={size}"):
        pytest.skip("cannot mount a small tmpfs here (needs root); no_space_writers covers ENOSPC")
    try:
        yield path
    finally:
        _umount(path)


def no_space_writers(monkeypatch: pytest.MonkeyPatch, after_bytes: int = 16) -> None:
    """Make torch.save, safetensors' save_file and file writes under ``atomic_write`` fail as a full disk
    does: part of the file is written, then ``OSError(ENOSPC)`` is raised."""
    import safetensors.torch
    import torch

    def failing(path) -> None:
        if isinstance(path, (str, os.PathLike)):
            with open(path, "wb") as handle:
                handle.write(b"\0" * after_bytes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    original = safetensors.torch.save_file
    failing_save_file = lambda tensors, filename, *a, **k: failing(filename)  # noqa: E731
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: failing(f))
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    # Modules that imported save_file by name hold the original: patch them too.
    for name, module in list(sys.modules.items()):
        if name.startswith("beit3") and getattr(module, "save_file", None) is original:
            monkeypatch.setattr(module, "save_file", failing_save_file)


def run_cli(args: Sequence[str]) -> tuple[int, str, str]:
    """``beit3 <args>`` in this process: (exit code, stdout, stderr)."""
    from beit3.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    """Failed with exit code != 0, no traceback, and a last line naming each of ``needles``."""
    assert code != 0, f"expected a failure; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert "error:" in last, stderr
    for needle in needles:
        assert str(needle) in last, f"{needle!r} not in the error line: {last!r}"


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, to prove a failure changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def kill_when(cmd: Sequence[str], predicate: Callable[[], bool], timeout: float = 300.0,
              env: dict[str, str] | None = None) -> int:
    """Run ``cmd``; SIGKILL it as soon as ``predicate()`` is true. Returns the exit code
    (``-9`` when killed). Fails the test when the command ends or times out first."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if predicate():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return proc.returncode
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"{cmd} ended (code {proc.returncode}) before it could be killed:\n{output[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"{cmd} did not reach the kill point within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode
