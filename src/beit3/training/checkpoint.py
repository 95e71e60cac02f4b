"""Checkpoint folders that survive being killed at any instant.

A checkpoint is a folder ``step_<8 digits>/`` holding

* ``model.safetensors`` (and ``ema.safetensors``): full, unsharded weights, loadable without torch
  pickles; with the model's ``config.json`` the folder doubles as a ``from_pretrained`` folder;
* ``trainer_state.pt``: optimizer, schedule, loss scaler, RNG states, data position and counters,
  as tensors and plain types only, so it loads with ``torch.load(weights_only=True)``;
* ``run.yaml``: the run configuration;
* ``manifest.json``: written last, the step and the size and SHA-256 of every file.

With ``train.checkpoint_format: sharded`` the weights, optimizer moments and EMA are instead a
``torch.distributed.checkpoint`` (DCP) folder ``sharded/`` that every process writes its own shards
into (no gather onto one process); DCP re-shards on load, so such a checkpoint resumes on another
number of processes. :func:`consolidate` turns one into a ``config.json`` + ``model.safetensors`` folder.

Everything is written into ``step_<n>.tmp-<pid>/`` (sharded: ``step_<n>.tmp-sharded/``, the same name
on every process) and the folder is renamed into place only when complete (after every process
finished its shards), so a run killed mid-save leaves a temp folder that resume ignores and the previous
checkpoint intact. Resume verifies the manifest and falls back to older checkpoints on mismatch.
A save that fails (a full disk, a quota) removes its temp folder and raises one ``OSError`` naming
the checkpoint folder and the plain reason; earlier checkpoints are untouched. Files get the
default permissions of the umask (safetensors alone would write them owner-only, 0600).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safetensors.torch import load_file, save_file

from beit3.io import atomic_write_text, describe_os_error, fsync_dir, fsync_file

logger = logging.getLogger("beit3.training")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.pt"
BEST_FILE = "best.json"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage (tied weights), so repeated storages are cloned."""
    seen: set[tuple[int, int]] = set()
    plain = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen.add(key)
        plain[name] = tensor
    save_file(plain, str(path), metadata={"format": "pt"})
    os.chmod(path, default_file_mode())  # safetensors creates its files 0600


def _os_error_of(err: BaseException) -> OSError | None:
    """The operating-system error behind a failed write: ``err`` itself, one it was raised from
    (``torch.save`` wraps it in a RuntimeError), or the ``(os error N)`` safetensors puts in its text."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        found = re.search(r"\(os error (\d+)\)", str(current))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        current = current.__cause__ or current.__context__
    return None


def _raise_named(err: BaseException, final: Path) -> None:
    """Re-raise a failed write as one ``OSError`` naming the checkpoint folder (or as it is)."""
    cause = _os_error_of(err) if isinstance(err, Exception) else None
    if cause is None:
        raise err
    reason = describe_os_error(cause, reason_only=True)
    if reason.startswith("["):  # no plain wording for this errno: the system's own
        reason = cause.strerror or os.strerror(cause.errno)
    raise OSError(cause.errno, reason, str(final)) from None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    text_files: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically (call on one process only).

    On failure the temp folder is removed and an ``OSError`` naming the checkpoint folder is raised
    (``<root>/step_<n>: no space left on the device``); checkpoints saved before are not touched.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        _write_folder(tmp, step, model_state, trainer_state, ema_state, text_files)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_named(err, final)
    _move_into_place(tmp, final)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    root = final.parent
    if final.exists():
        # Same step saved twice (e.g. the last periodic save and the end of training): swap the
        # old folder out first so there is never a moment without a complete copy on disk.
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def _write_folder(tmp: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                  ema_state: dict[str, torch.Tensor] | None, text_files: dict[str, str] | None) -> None:
    """Every file of a checkpoint, then its manifest, into the folder ``tmp`` (made afresh)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model_state, tmp / MODEL_FILE)
    if ema_state is not None:
        _save_tensors(ema_state, tmp / EMA_FILE)
    # Through a Python file, so a failed write keeps its OSError (torch's own writer only says
    # "unexpected pos").
    with open(tmp / STATE_FILE, "wb") as handle:
        torch.save(trainer_state, handle)
    for name, text in (text_files or {}).items():
        (tmp / name).write_text(text)
    _write_manifest(tmp, step)


def _write_manifest(tmp: Path, step: int, **extra: Any) -> None:
    """``manifest.json`` (last): size and SHA-256 of every file below ``tmp``, by relative path."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
        fsync_dir(folder)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, **extra, "files": files}, indent=2))
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)


SHARDED_DIR = "sharded"
"""The DCP folder inside a sharded checkpoint."""


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder holds a DCP (sharded) checkpoint."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def save_sharded_checkpoint(
    root: Path,
    step: int,
    *,
    state: dict[str, Any],
    trainer_state: dict[str, Any] | None,
    text_files: dict[str, str] | None = None,
    is_main: bool = True,
    barrier: Any = None,
    asynchronous: bool = False,
    process_group: Any = None,
    on_complete: Callable[[Path], None] | None = None,
) -> "Path | None | PendingCheckpoint":
    """Write a DCP checkpoint atomically: a collective call on every process.

    ``state`` (model, optimizer, EMA state dicts; DTensors for FSDP) goes through
    ``torch.distributed.checkpoint.save`` into ``step_<n>.tmp-sharded/sharded``, each process writing
    its own shards (replicated tensors, e.g. under DDP, once). Once every process has finished, the
    main one adds ``trainer_state`` (which it alone passes), the text files and the manifest, and
    renames the folder into place: a run killed before that leaves a temp folder that is never resumed.
    Returns the folder on the main process, None on the others.

    ``asynchronous=True``: ``torch.distributed.checkpoint.async_save`` copies the state to CPU memory
    and writes it in a background thread, talking to the other processes over ``process_group`` (a
    gloo group of its own, so its collectives never interleave with training's). The call returns a
    :class:`PendingCheckpoint` at once; on the main process its completion (DCP's, which follows every
    process's writes) adds the trainer state and manifest and renames the folder, then calls
    ``on_complete(folder)``. Wait for it before the next save.
    """
    import torch.distributed.checkpoint as dcp

    barrier = barrier or (lambda: None)
    final = checkpoint_path(root, step)
    tmp = final.with_name(f"{final.name}.tmp-sharded")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a save killed half-way
        tmp.mkdir()
    barrier()
    # Serialised now: training goes on changing what the trainer state refers to.
    state_bytes = io.BytesIO()
    if is_main:
        torch.save(trainer_state, state_bytes)

    def finish() -> Path | None:
        if not is_main:
            return None
        try:
            with open(tmp / STATE_FILE, "wb") as handle:
                handle.write(state_bytes.getvalue())
            for name, text in (text_files or {}).items():
                (tmp / name).write_text(text)
            _write_manifest(tmp, step, format="sharded")
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            _raise_named(err, final)
        _move_into_place(tmp, final)
        if on_complete is not None:
            on_complete(final)
        return final

    def failed(err: BaseException) -> None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_named(err, final)

    if asynchronous:
        try:
            started = dcp.async_save(state, checkpoint_id=str(tmp / SHARDED_DIR), process_group=process_group,
                                     no_dist=not _distributed())
        except BaseException as err:
            failed(err)
        # A Future, or (with asynchronous staging) a response whose upload_completion is the Future.
        return PendingCheckpoint(getattr(started, "upload_completion", started), final, finish, failed)
    try:
        dcp.save(state, checkpoint_id=str(tmp / SHARDED_DIR), no_dist=not _distributed())
    except BaseException as err:
        failed(err)
    barrier()  # every process's shards are on disk
    return finish()


class PendingCheckpoint:
    """A sharded checkpoint being written in the background (``train.async_checkpoint``).

    ``wait()`` blocks until it is in place and returns its folder (None on processes other than the
    main one), or raises what made it fail -- then no folder appears and the previous checkpoints stay.
    """

    def __init__(self, future: Any, final: Path, finish: Callable[[], Path | None],
                 failed: Callable[[BaseException], None]) -> None:
        self.final = final
        self._done = threading.Event()
        self._path: Path | None = None
        self._error: BaseException | None = None

        def complete(done_future: Any) -> None:
            try:
                try:
                    done_future.result()
                except BaseException as err:
                    failed(err)  # cleans up and raises the error named after the checkpoint
                self._path = finish()
            except BaseException as err:
                self._error = err
            finally:
                self._done.set()

        future.add_done_callback(complete)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Path | None:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._path


def sharded_keys(path: Path) -> set[str]:
    """The flattened keys (``model.<name>``, ``optim.state.<name>.exp_avg``, ...) a sharded checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(Path(path) / SHARDED_DIR)).read_metadata().state_dict_metadata)


def load_sharded(path: Path, state: dict[str, Any]) -> None:
    """Load a sharded checkpoint into ``state`` in place (collective with a process group): each
    process reads the pieces of its own shards, whatever the number of processes that saved it."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR), no_dist=not _distributed())


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def consolidate(path: str | Path, out_dir: str | Path, *, ema: bool = False) -> Path:
    """Turn a checkpoint folder (sharded or full) into a ``from_pretrained`` folder: ``config.json`` +
    ``model.safetensors`` with the full weights (``ema=True``: the averaged weights, when saved).

    Runs in one process without a process group, whatever the number of processes that saved it;
    ``beit3 convert`` calls it. The files are written atomically, into ``out_dir`` (created).
    """
    from beit3.io import atomic_write

    path, out = Path(path), Path(out_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint folder")
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        keys = sharded_keys(path)
        prefix = "ema." if ema and any(k.startswith("ema.") for k in keys) else "model."
        wanted = {k for k in keys if k.startswith(prefix)}  # not the optimizer moments (2x the weights)
        loaded: dict[str, Any] = {}
        if wanted:  # in this process alone, even when it belongs to a process group (the end of a run)
            _load_state_dict(loaded, storage_reader=FileSystemReader(str(path / SHARDED_DIR)), no_dist=True,
                             planner=_EmptyStateDictLoadPlanner(keys=wanted))
        weights = loaded.get(prefix.rstrip("."), {})
    elif (path / MODEL_FILE).is_file():
        source = EMA_FILE if ema and (path / EMA_FILE).is_file() else MODEL_FILE
        weights = load_file(str(path / source))
    else:
        raise ValueError(f"{path} holds neither {SHARDED_DIR}/ nor {MODEL_FILE}: not a training checkpoint")
    if not weights:
        raise ValueError(f"{path} holds no model weights")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, lambda tmp: _save_tensors(weights, Path(tmp)))
    if (path / "config.json").is_file():
        atomic_write(out / "config.json", lambda tmp: shutil.copyfile(path / "config.json", tmp))
    return out


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temp folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def verify_checkpoint(path: Path) -> None:
    """Raise ``ValueError`` unless every file the manifest lists is present and unchanged."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} has no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise ValueError(f"{file} has {file.stat().st_size} bytes, expected {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise ValueError(f"{file} does not match its checksum")


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    for path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
        except (ValueError, OSError, json.JSONDecodeError, KeyError) as err:
            logger.warning("skipping damaged checkpoint %s: %s", path, err)
            continue
        return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(model weights, trainer state, EMA weights or None) of a checkpoint folder."""
    model_state = load_file(str(path / MODEL_FILE))
    trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    ema_state = load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None
    return model_state, trainer_state, ema_state


def check_optimizer_state(trainable: list[str], optimizer_state: dict[str, Any],
                          aliases: dict[str, str] | None = None) -> list[str]:
    """Check a checkpoint's optimizer state belongs to a model with these trainable parameters.

    The state names every parameter the optimizer held (``param_groups``) but keeps moments only for
    those that received a gradient: AdamW creates them lazily, so parameters unused by a task (the
    text embeddings in image-only fine-tuning) have none, and resuming must accept that. A real
    mismatch (a parameter the checkpoint's optimizer never held, or one this model lacks) is a
    ``ValueError``. ``aliases`` maps the other names of tied parameters to the name in ``trainable``.
    Returns the parameters without saved state (as the checkpoint names them).
    """
    aliases = aliases or {}
    listed = [name for group in optimizer_state.get("param_groups", []) for name in group.get("params", [])]
    saved = list(dict.fromkeys(aliases.get(name, name) for name in listed))
    saved_set, trainable_set = set(saved), set(trainable)
    missing = [name for name in trainable if name not in saved_set]
    unexpected = [name for name in saved if name not in trainable_set]
    stray = [str(name) for name in optimizer_state.get("state", {}) if aliases.get(name, name) not in saved_set]
    if missing or unexpected or stray:
        def some(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = [f"{len(missing)} trainable parameter(s) it never held ({some(missing)})" if missing else "",
                 f"{len(unexpected)} parameter(s) this model does not train ({some(unexpected)})" if unexpected else "",
                 f"state for {len(stray)} unnamed parameter(s) ({some(stray)})" if stray else ""]
        raise ValueError("the checkpoint's optimizer state does not match this model: "
                         + "; ".join(p for p in parts if p)
                         + ". Resume with the model (and frozen parameters) of that run, or start fresh")
    with_state = {aliases.get(name, name) for name in optimizer_state.get("state", {})}
    return [name for name in saved if name not in with_state]


def read_best(root: Path) -> dict[str, Any] | None:
    path = root / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(root: Path, step: int, metric_name: str, value: float) -> None:
    """Point ``best.json`` at a checkpoint; the folder is then exempt from pruning."""
    record = {"step": step, "path": checkpoint_path(root, step).name, "metric": metric_name, "value": value}
    atomic_write_text(root / BEST_FILE, json.dumps(record, indent=2))


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one, and stale temp folders."""
    best = read_best(root)
    keep = {p.name for p in list_checkpoints(root)[:keep_last]}
    if best is not None:
        keep.add(best["path"])
    for path in list_checkpoints(root):
        if path.name not in keep:
            shutil.rmtree(path)
    for path in root.iterdir():
        if ".tmp-" in path.name or ".old-" in path.name:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors / numbers, so ``torch.load(weights_only=True)`` can read them."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": version,
        "python_state": torch.tensor(mt_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
