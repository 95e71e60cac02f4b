"""What every builder shares: a report of counts and problems, image checks, and the final write.

A build reads annotation files that are often large and partly broken (images missing from a
download, empty captions). It keeps going, counts every problem by kind with a few examples, and
prints that report, so one run shows everything to fix. It refuses to write an index with no row.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from beit3.data.index import DataError, EmptyDatasetError, IndexFormatError, relative_image_path, write_jsonl

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
                with Image.open(path) as image:
                    image.verify()
            except Exception as err:  # PIL raises many types for broken files
                good = False
                self.report.problem("unreadable image", f"{path} ({err})")
        self._seen[path] = good
        return good


def finish(report: BuildReport, splits: dict[str, list[dict[str, Any]]], *, strict: bool) -> BuildReport:
    """Write each non-empty split as ``out_dir/<name>``; refuse when nothing, or with ``strict`` any problem, is wrong.

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
    for name, rows in splits.items():
        if rows:
            report.counts[name] = write_jsonl(report.out_dir / name, rows)
    return report


def image_field(path: Path, out_dir: Path) -> str:
    """The ``image_path`` value for a row of an index written to ``out_dir``."""
    return relative_image_path(path, out_dir)


def require(record: dict[str, Any], keys: tuple[str, ...], source: str | os.PathLike, where: str) -> None:
    """Raise a file-and-record error when an annotation record lacks a field the format requires."""
    missing = [key for key in keys if key not in record]
    if missing:
        raise IndexFormatError(source, None, f"{where}: missing field(s) {', '.join(missing)}")
