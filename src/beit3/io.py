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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path: Path) -> Path:
    """A hidden sibling name for writing ``path``, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(temporary_path)``, flush it, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        # Some writers (safetensors, tempfile) create their file owner-only: give it what a plain
        # open() would, the umask's default, so a shared checkpoint is readable by the group.
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def describe_os_error(err: OSError, reason_only: bool = False) -> str:
    """One line for a failed file operation: the path and the plain reason (only the reason when
    ``reason_only``)."""
    import errno

    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "the file system is read-only",
        errno.ENOENT: "no such file or folder",
        errno.ENOTDIR: "not a folder",
        errno.EISDIR: "is a folder",
    }
    if err.errno is None or err.errno not in reasons:
        return str(err)
    reason = reasons[err.errno]
    if reason_only:
        return reason
    where = err.filename
    if where is None:
        # Some writers (torch.save, safetensors) wrap the OS error; its cause keeps the path.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError) and cause.filename is not None:
            where = cause.filename
    return f"{where}: {reason}" if where is not None else reason


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) when missing and prove a file can be written in it.

    Commands call this before doing any work, so a read-only or full destination fails in one line
    at the start rather than after minutes of computation. Raises ``PermissionError``/``OSError``
    with a message naming the folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".beit3-write-test-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"0")
        probe.unlink()
    except OSError as err:
        error = PermissionError if isinstance(err, PermissionError) else OSError
        raise error(f"cannot write to the {what} {path}: {describe_os_error(err, reason_only=True)}") from None
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """The folder of ``path`` can take a new file (see ``ensure_writable_dir``); ``path`` is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of the {what}")
    return path
