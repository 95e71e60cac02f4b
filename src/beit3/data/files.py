"""Image files named on a command line: the one lister of ``beit3 predict`` and ``beit3 search``.

The rule, the same for every command:

* a file named explicitly is always taken, whatever its suffix (reading it says whether it is an
  image);
* in a folder, only files with an image suffix (``IMAGE_SUFFIXES``) are taken; other files are
  ignored and counted, hidden names (``.xyz``) are skipped;
* sub-folders are entered only with ``recursive``; otherwise they are counted, and one line on
  stderr says how many were not entered and that ``--recursive`` includes them;
* a name that does not exist is reported as skipped.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm"})
"""Suffixes (lower case) of the image files taken from folders; defined here once."""


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has an image suffix (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


def _write_line(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # between progress-bar updates, not through them


class InputReport:
    """What happened to the inputs: files skipped (each reported on stderr once, as it is met),
    non-image files ignored in folders, and sub-folders not entered."""

    def __init__(self) -> None:
        self.skipped: list[dict[str, str]] = []
        self.ignored: list[str] = []  # files in folders without an image suffix
        self.not_entered: list[str] = []  # sub-folders left out (not recursive)

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped.append({"file": str(path), "reason": reason})
        _write_line(f"skipped {path}: {reason}")

    def note(self, line: str) -> None:
        _write_line(line)

    def listing_line(self) -> str | None:
        """One line about the folders' files that were left out, or None when none was."""
        parts = []
        if self.ignored:
            count = len(self.ignored)
            parts.append(f"{count} non-image file{'s' if count != 1 else ''} in folders ignored "
                         f"(e.g. {self.ignored[0]})")
        if self.not_entered:
            count = len(self.not_entered)
            parts.append(f"{count} sub-folder{'s' if count != 1 else ''} not entered "
                         f"(e.g. {self.not_entered[0]}); pass --recursive to include them")
        return "note: " + "; ".join(parts) if parts else None


def list_images(inputs: Sequence[str | os.PathLike], report: InputReport, *, recursive: bool = False) -> list[Path]:
    """The image files of ``inputs`` (files and folders), by the rule of the module docstring.

    Files named come in the order given; each folder's images come sorted by path. A file named
    twice, or reached twice, is listed once. What was left out is counted in ``report`` and
    summarised in one line on stderr.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[Path] = []
    seen: set[Path] = set()

    def take(path: Path) -> None:
        if path not in seen:
            seen.add(path)
            paths.append(path)

    ignored_before, not_entered_before = len(report.ignored), len(report.not_entered)
    for item in map(Path, inputs):
        if item.is_dir():
            for path in _folder_images(item, report, recursive):
                take(path)
        elif item.is_file():
            take(item)
        else:
            report.skip(item, "no such file or folder")
    if len(report.ignored) > ignored_before or len(report.not_entered) > not_entered_before:
        line = InputReport()
        line.ignored = report.ignored[ignored_before:]
        line.not_entered = report.not_entered[not_entered_before:]
        report.note(line.listing_line())
    return paths


def _folder_images(folder: Path, report: InputReport, recursive: bool) -> list[Path]:
    found: list[Path] = []
    for current, subfolders, files in os.walk(folder):
        visible = sorted(name for name in subfolders if not name.startswith("."))
        if recursive:
            subfolders[:] = visible
        else:
            report.not_entered += [os.path.join(current, name) for name in visible]
            subfolders[:] = []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(current, name)
            if not os.path.isfile(path):  # a broken link, a socket
                continue
            if is_image_name(name):
                found.append(Path(path))
            else:
                report.ignored.append(path)
    return sorted(found)
