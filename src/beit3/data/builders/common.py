"""What every builder shares: a report of counts and problems, image checks, progress, and the final write.

A build reads annotation files that are often large and partly broken (images missing from a
download, empty captions). It keeps going, counts every problem by kind with a few examples, and
prints that report, so one run shows everything to fix. It refuses to write an index with no row.

The files of one build are written all or nothing (:func:`write_all`): every file goes to a
temporary name first and only when all are written are they renamed over the old ones, so a full
disk or an interrupted build leaves the previous index exactly as it was.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from beit3.data.index import DataError, EmptyDatasetError, IndexFormatError, relative_image_path
from beit3.io import fsync_dir, fsync_file, temporary_name

T = TypeVar("T")
PROGRESS_INTERVAL = 30.0
"""Seconds between two plain progress lines when stderr is not a terminal (a log file, CI)."""

MAX_EXAMPLES = 3


@dataclass
class BuildReport:
    """Outcome of one build: rows per written index, problems found and informational notes."""

    task: str
    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def problem(self, kind: str, example: str) -> None:
        """Count one problem of ``kind`` (e.g. "missing image") and keep the first few examples."""
        self.problems[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def summary(self) -> str:
        """Human-readable report, printed by ``beit3 data build``."""
        lines = [f"{self.task}: wrote {sum(self.counts.values())} rows to {self.out_dir}"]
        lines += [f"  {name}: {count}" for name, count in self.counts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        for kind, count in self.problems.items():
            lines.append(f"  problem: {count} x {kind}, e.g. {'; '.join(self.examples[kind])}")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


class ImageChecker:
    """Checks that image files exist (and optionally decode), caching results and reporting failures."""

    def __init__(self, report: BuildReport, *, verify: bool = False) -> None:
        self.report = report
        self.verify = verify
        self._seen: dict[Path, bool] = {}

    def ok(self, path: Path) -> bool:
        """True when ``path`` can be used; otherwise the problem is counted once per file."""
        if path in self._seen:
            return self._seen[path]
        good = path.is_file()
        if not good:
            self.report.problem("missing image", str(path))
        elif self.verify:
            try:
                # verify() checks the container (PNG checksums) but decodes nothing: a truncated
                # JPEG passes it. Decoding the whole image (load()) is what training will do.
                with Image.open(path) as image:
                    image.verify()
                with Image.open(path) as image:
                    image.load()
            except Exception as err:  # PIL raises many types for broken files
                good = False
                self.report.problem("unreadable image", f"{path} ({err})")
        self._seen[path] = good
        return good


def finish(report: BuildReport, splits: dict[str, list[dict[str, Any]]], *, strict: bool,
           extra: dict[str, str] | None = None) -> BuildReport:
    """Write each non-empty split as ``out_dir/<name>`` and the ``extra`` text files (name -> text),
    all or nothing (:func:`write_all`); refuse when nothing, or with ``strict`` any problem, is wrong.

    An empty split is skipped and reported (a user may have only some splits), but a build where every
    split is empty is an error: that index would point at nothing.
    """
    for name, rows in splits.items():
        if not rows:
            report.problem("empty split (not written)", name)
    if strict and report.problems:
        raise DataError(report.summary() + "\n(strict: fix these problems or build without --strict)")
    if not any(splits.values()):
        raise EmptyDatasetError(report.summary() + "\nrefusing to write an index that points at nothing")
    files = {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
             for name, rows in splits.items() if rows}
    write_all(report.out_dir, {**files, **(extra or {})})
    report.counts.update({name: len(rows) for name, rows in splits.items() if rows})
    return report


def write_all(folder: str | os.PathLike, files: dict[str, str]) -> None:
    """Write ``files`` (name -> text) into ``folder`` all or nothing.

    Each file is written and flushed under a temporary name beside its target; only when every one
    is on disk are they renamed over the old files. A failure while writing (a full disk) removes
    the temporary files and raises an ``OSError`` naming the file, leaving the old files untouched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in files.items():
            target = folder / name
            tmp = temporary_name(target)
            staged.append((tmp, target))
            try:
                tmp.write_text(text, encoding="utf-8")
                fsync_file(tmp)
            except OSError as err:
                if err.filename is None:  # a failed write() or close() names no file: name it
                    raise OSError(err.errno, err.strerror, str(target)) from err
                raise
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    fsync_dir(folder)


def progress(items: Iterable[T], *, total: int | None, desc: str) -> Iterator[T]:
    """``items``, with progress on stderr: a tqdm bar on a terminal, else a plain line every
    ``PROGRESS_INTERVAL`` seconds (``desc: done/total (percent)``), so a long build shows it is alive."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="item", file=sys.stderr, leave=False)
        return
    last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL:
            last = now
            share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            print(f"{desc}: {done}{share}", file=sys.stderr, flush=True)


def image_field(path: Path, out_dir: Path) -> str:
    """The ``image_path`` value for a row of an index written to ``out_dir``."""
    return relative_image_path(path, out_dir)


def require(record: dict[str, Any], keys: tuple[str, ...], source: str | os.PathLike, where: str) -> None:
    """Raise a file-and-record error when an annotation record lacks a field the format requires."""
    missing = [key for key in keys if key not in record]
    if missing:
        raise IndexFormatError(source, None, f"{where}: missing field(s) {', '.join(missing)}")
