"""Files in, records out, for every `beit3 predict` command.

In: the image files named on the command line and every file under the folders named, loaded
one at a time with :func:`beit3.processing.load_image`; a file that cannot be used (missing,
empty, not an image, corrupt, a decompression bomb) is reported on stderr in one line and
skipped, so one bad file never stops a folder. Out: JSON or CSV (by the file's suffix) and a
table on stdout.
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from beit3.processing import load_image

OUTPUT_FORMATS = (".json", ".csv")


class InputReport:
    """The inputs that were skipped, each reported on stderr once as it is met."""

    def __init__(self) -> None:
        self.skipped: list[dict[str, str]] = []

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped.append({"file": str(path), "reason": reason})
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)  # between progress-bar updates


def list_images(inputs: Sequence[Path], report: InputReport) -> list[Path]:
    """Files named, plus the non-hidden files in the folders named (sorted; sub-folders are not entered).

    Folder contents are not filtered by suffix: a file that is not an image is reported when it
    fails to load, rather than silently left out. A name that does not exist is reported here.
    """
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith("."))
        elif item.is_file():
            paths.append(item)
        else:
            report.skip(item, "no such file or folder")
    return paths


def load_groups(groups: Sequence[tuple[Path, ...]], batch_size: int, report: InputReport,
                desc: str) -> Iterator[list[tuple[int, tuple[Image.Image, ...]]]]:
    """Load groups of files (one image, or an NLVR2 pair) ``batch_size`` groups at a time, with a
    progress bar. Yields ``(index in groups, RGB images)``; a group with any unreadable file is
    reported and left out of its batch."""
    with tqdm(total=len(groups), desc=desc, unit="input", disable=None, file=sys.stderr) as progress:
        for start in range(0, len(groups), batch_size):
            loaded = []
            for index in range(start, min(start + batch_size, len(groups))):
                images = []
                for path in groups[index]:
                    try:
                        images.append(load_image(path))
                    except (ValueError, OSError) as err:
                        others = ", ".join(str(p) for p in groups[index] if p != path)
                        report.skip(path, _reason(err) + (f" (left out with {others})" if others else ""))
                        break
                else:
                    loaded.append((index, tuple(images)))
            if loaded:
                yield loaded
            progress.update(min(batch_size, len(groups) - start))


def load_images(paths: Sequence[Path], batch_size: int, report: InputReport,
                desc: str) -> Iterator[list[tuple[Path, Image.Image]]]:
    """:func:`load_groups` for single images: batches of ``(path, RGB image)``."""
    for batch in load_groups([(path,) for path in paths], batch_size, report, desc):
        yield [(paths[index], images[0]) for index, images in batch]


def _reason(err: Exception) -> str:
    """The message without load_image's "cannot read image '<file>': " (the report names the file)."""
    message = str(err)
    return message.split("': ", 1)[1] if message.startswith("cannot read image '") and "': " in message else message


def check_output_path(path: Path | None) -> None:
    """Refuse an output suffix we cannot write before any work is done."""
    if path is not None and path.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--output {path}: the format comes from the suffix; use a .json or .csv file name")


def flatten(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV rows: a record holding a ranked list (answers, labels) becomes one row per rank."""
    rows = []
    for record in records:
        ranked = next((k for k, v in record.items() if isinstance(v, list)), None)
        if ranked is None:
            rows.append(record)
            continue
        base = {k: v for k, v in record.items() if k != ranked}
        rows += [{**base, "rank": rank, **item} for rank, item in enumerate(record[ranked], start=1)]
    return rows


def write_output(path: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """JSON: ``summary`` plus ``predictions`` (records as they are); CSV: the flattened records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**summary, "predictions": list(records)}, indent=2) + "\n", encoding="utf-8")
        return
    rows = flatten(records)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):  # ranked answers or labels: "red 0.912, blue 0.051"
        return ", ".join(" ".join(_cell(v) for v in item.values()) for item in value)
    return str(value)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One line per record, columns aligned."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    cells = [[_cell(record.get(key, "")) for key in columns] for record in records]
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [columns, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(records: Sequence[dict[str, Any]], report: InputReport, output: Path | None,
           summary: dict[str, Any]) -> int:
    """Write and show the results; 0 when anything was predicted, else an error saying what to do."""
    require_predictions(records, report)
    if output is not None:
        write_output(output, records, {**summary, "skipped": report.skipped})
    print(format_table(records))
    done = f"predicted {len(records)}" + (f", skipped {len(report.skipped)} (see above)" if report.skipped else "")
    print(done + (f"; written: {output}" if output is not None else ""), file=sys.stderr)
    return 0


def require_predictions(records: Sequence[Any], report: InputReport) -> None:
    """An error saying what to do when nothing could be predicted."""
    if not records:
        if report.skipped:
            raise ValueError(f"nothing was predicted: all {len(report.skipped)} input(s) were skipped (reasons above); "
                             "pass image files PIL can read, or folders holding them")
        raise ValueError("nothing was predicted: no input files were found; pass image files or folders holding them")
