"""Files in, records out, for every `beit3 predict` command.

In: the image files named on the command line and the images in the folders named, listed by
:func:`beit3.data.files.list_images` (the lister ``beit3 search`` uses too: image suffixes only in
folders, sub-folders only with ``--recursive``, what is left out counted and said in one line),
then loaded one at a time with :func:`beit3.processing.load_image`; a file that cannot be used
(missing, empty, not an image, corrupt, a decompression bomb) is reported on stderr in one line and
skipped, so one bad file never stops a folder. Out: JSON or CSV (by the file's suffix), written
atomically, and a table on stdout.
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

from beit3.data.files import IMAGE_SUFFIXES, InputReport, list_images
from beit3.io import atomic_write, ensure_writable_file
from beit3.processing import load_image

__all__ = ["IMAGE_SUFFIXES", "InputReport", "OUTPUT_FORMATS", "check_output_path", "finish", "flatten",
           "format_table", "list_images", "load_groups", "load_images", "require_predictions", "write_output"]

OUTPUT_FORMATS = (".json", ".csv")


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
    """Refuse, before any work is done, an output suffix we cannot write or a place we cannot write to
    (a read-only or missing-permission folder fails here in one line, not after the predictions)."""
    if path is None:
        return
    if Path(path).suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--output {path}: the format comes from the suffix; use a .json or .csv file name")
    ensure_writable_file(path, what="--output file")


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
    """JSON: ``summary`` plus ``predictions`` (records as they are); CSV: the flattened records.
    Written atomically: a failure (a full disk) leaves the previous file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        text = json.dumps({**summary, "predictions": list(records)}, indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return
    rows = flatten(records)
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write_csv)


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
