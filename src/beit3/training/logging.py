"""What a run shows and records: progress bar, ``metrics.jsonl``, TensorBoard, final summary.

Only the main process writes; the others get a :class:`RunLogger` that does nothing, so the loop
never branches on rank. ``metrics.jsonl`` is the source of truth (one JSON object per line, easy to
load with pandas); TensorBoard event files are written alongside when the ``tensorboard`` package is
installed.

``metrics.jsonl`` holds the history of the run up to its current step: a resumed run first drops
the records after the step of its checkpoint (a killed run logged them, the resumed one logs them
again), and a fresh run starts a fresh file, so steps only ever increase along the file.

The progress bar (tqdm) is drawn only when stderr is a terminal. Into a log file or a pipe, where
every redraw would be another carriage-return line, a plain line is printed instead at most every
``PLAIN_PROGRESS_SECONDS`` (and for the last step).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("beit3.training")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the first
    run: a later run in the same process (a notebook, a test) may have redirected or closed it."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console_logging(is_main: bool) -> None:
    """Warnings from every process, info from the main one, one line each on stderr."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


PLAIN_PROGRESS_SECONDS = 30.0
"""Seconds between the plain progress lines printed when stderr is not a terminal."""


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` (metrics.jsonl) after ``last_step``; returns how many were dropped.

    A record that cannot be read (the half line of a killed run) is dropped too.
    """
    if not path.is_file():
        return 0
    from beit3.io import atomic_write_text

    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if isinstance(step, (int, float)) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class RunLogger:
    """Progress bar (or plain progress lines) plus metric sinks for one run."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        self.plain_progress = False
        self.step, self.total_steps = start_step, total_steps
        self._last_line = time.monotonic()
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(output_dir / "metrics.jsonl", start_step)
        if dropped:
            logger.info("metrics.jsonl: dropped %d record(s) after step %d, the step this run starts from",
                        dropped, start_step)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only "
                        "(pip install tensorboard to get event files)")
        else:
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step)
        if progress_bar and stderr_is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        elif progress_bar:
            self.plain_progress = True

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        """One record to metrics.jsonl and TensorBoard (``<split>/<name>`` tags)."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)

    def progress(self, steps: int, postfix: dict[str, Any]) -> None:
        self.step += steps
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)
        elif self.plain_progress:
            now = time.monotonic()
            if now - self._last_line >= PLAIN_PROGRESS_SECONDS or self.step >= self.total_steps:
                self._last_line = now
                share = 100 * self.step / max(self.total_steps, 1)
                values = " ".join(f"{k}={v}" for k, v in postfix.items())
                print(f"[{time.strftime('%H:%M:%S')}] step {self.step}/{self.total_steps} ({share:.0f}%) {values}",
                      file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """Print above the bar without breaking it."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable final summary block."""
    width = max(len(k) for k in summary)
    lines = ["training summary"] + [f"  {k.ljust(width)}  {v}" for k, v in summary.items()]
    return "\n".join(lines)
