"""Files written so that a crash never leaves half of one: the one atomic writer of the package.

A file is written under a temporary name in its own folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so readers see the old file or the new one.
The temporary file is removed when writing fails, and gets the default permissions (not the
owner-only mode of ``tempfile.mkstemp``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden sibling name for writing ``path``, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(temporary_path)``, flush it, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
