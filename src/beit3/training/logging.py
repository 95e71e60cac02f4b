"""What a run shows and records: progress bar, ``metrics.jsonl``, TensorBoard, final summary.

Only the main process writes; the others get a :class:`RunLogger` that does nothing, so the loop
never branches on rank. ``metrics.jsonl`` is the source of truth (one JSON object per line, easy to
load with pandas); TensorBoard event files are written alongside when the ``tensorboard`` package is
installed.
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


def setup_console_logging(is_main: bool) -> None:
    """Warnings from every process, info from the main one, one line each on stderr."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


class RunLogger:
    """Progress bar plus metric sinks for one run."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only "
                        "(pip install tensorboard to get event files)")
        else:
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

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
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)

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
