"""Index files: JSON lines with one sample per line, raw text kept.

Every task dataset reads an index written by a builder in ``beit3.data.builders``. Rows keep the
raw caption/question/statement rather than token ids (the official release stores ids), so one
index serves any tokenizer and can be read by a person. Image paths inside a row are relative to
the folder that holds the index file, so an index and its images can be moved together.

Errors here always name the file and line: a malformed annotation is fixed by editing that line,
and a message without it sends the user hunting through millions of rows.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from beit3.io import atomic_write_text


class DataError(ValueError):
    """Bad input data (malformed file, nothing to read). A ``ValueError`` so the CLI reports it in one line."""


class IndexFormatError(DataError):
    """A line or record of an annotation or index file that cannot be used; the message names file and line."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class EmptyDatasetError(DataError):
    """A dataset with no usable sample. Raised when the dataset is built, so training never starts on nothing."""


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSON-lines file; blank lines are skipped, every other line must be an object with ``required`` keys."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise IndexFormatError(path, line_no, f"not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise IndexFormatError(path, line_no, f"expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise IndexFormatError(path, line_no, f"missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines and return how many were written; an index with no row is refused.

    The file is written next to its final name and renamed at the end, so an interrupted build never
    leaves a half-written index that a later training run would silently read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if not rows:
        raise EmptyDatasetError(f"refusing to write {path}: no usable sample")
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def read_json(path: str | os.PathLike) -> Any:
    """Load a whole JSON annotation file; a syntax error names file, line and column."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise IndexFormatError(path, err.lineno, f"not valid JSON ({err.msg} at column {err.colno})") from None


def relative_image_path(image: str | os.PathLike, index_dir: str | os.PathLike) -> str:
    """The path stored in an index row: relative to the index folder, with forward slashes on every OS."""
    return Path(os.path.relpath(image, index_dir)).as_posix()


def resolve_image_path(index_path: str | os.PathLike, image_path: str) -> Path:
    """Turn a row's ``image_path`` back into a file path (relative paths start at the index file's folder)."""
    path = Path(image_path)
    return path if path.is_absolute() else Path(index_path).parent / path
