"""What a model folder holds, found in one place for every consumer (pipelines, search, predict,
evaluate, fine-tuning): its training run's ``run.yaml``, its tokenizer, its image and text settings.

A folder written by ``save_pretrained`` holds everything itself; a training checkpoint
(``runs/<name>/final``, ``runs/<name>/checkpoints/step_N``) may not, and then the ``run.yaml``
the training wrote one or two folders up says where the tokenizer came from.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import yaml

from beit3.processing import Beit3ImageProcessor, Beit3Tokenizer
from beit3.processing.image import CONFIG_FILENAME as IMAGE_CONFIG
from beit3.processing.processor import CONFIG_FILENAME as PROCESSOR_CONFIG

TokenizerInput = Union[str, os.PathLike, Beit3Tokenizer, None]


def find_run_file(model_dir: str | os.PathLike) -> Path | None:
    """The ``run.yaml`` training wrote next to a checkpoint: in it, or one or two folders up."""
    folder = Path(model_dir)
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "run.yaml").is_file():
            return candidate / "run.yaml"
    return None


def find_run_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`find_run_file` as a plain dict; ``{}`` when there is none (a ``save_pretrained`` folder)."""
    file = find_run_file(model_dir)
    return (yaml.safe_load(file.read_text(encoding="utf-8")) or {}) if file is not None else {}


def run_setting(run: dict[str, Any], *keys: str) -> Any:
    """``run["a"]["b"]...`` or None when any level is missing."""
    value: Any = run
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def resolve_tokenizer(given: TokenizerInput = None, model_dir: str | os.PathLike | None = None, *,
                      also: Iterable[str | os.PathLike | None] = (), hint: str = "") -> Beit3Tokenizer:
    """The tokenizer of a model: ``given`` (a tokenizer, a SentencePiece file or a folder), else the
    one saved in ``model_dir``, else the one its training run used (``task.options.tokenizer`` or the
    ``model.pretrained`` folder of ``run.yaml``), else the first of ``also`` that holds one."""
    if isinstance(given, Beit3Tokenizer):
        return given
    if given is not None:
        return Beit3Tokenizer.from_pretrained(given)
    for candidate in tokenizer_candidates(model_dir, also):
        try:
            return Beit3Tokenizer.from_pretrained(candidate)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(
        f"no tokenizer for {model_dir or 'this model'}: " + (hint or "pass the SentencePiece file or tokenizer folder "
        "the model was trained with (--tokenizer, or tokenizer= in Python), or save it into the model folder with "
        "Beit3Tokenizer.save_pretrained"))


def tokenizer_candidates(model_dir: str | os.PathLike | None,
                         also: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """Where a model's tokenizer may be, in the order :func:`resolve_tokenizer` tries them: the
    folder, its run's ``task.options.tokenizer`` and ``model.pretrained``, then ``also``. Only
    folders and SentencePiece files count (a checkpoint ``.pth`` holds no tokenizer)."""
    candidates: list[Any] = []
    folder = Path(model_dir) if model_dir is not None else None
    if folder is not None and folder.is_dir():
        run = find_run_config(folder)
        candidates = [folder, run_setting(run, "task", "options", "tokenizer"), run_setting(run, "model", "pretrained")]
    candidates += list(also)
    return [Path(c) for c in candidates
            if c and Path(c).exists() and (Path(c).is_dir() or Path(c).suffix == ".spm")]


def has_tokenizer(path: Path) -> bool:
    """A SentencePiece file, or a folder holding a saved tokenizer."""
    return path.is_file() or (path / "tokenizer_config.json").is_file() or any(path.glob("*.spm"))


def load_image_processor(model_dir: Path | None, mode: str, image_size: int) -> Beit3ImageProcessor:
    """The image processor saved in the model folder, else the official evaluation pipeline of
    ``mode`` at the model's size."""
    if model_dir is not None and (model_dir / IMAGE_CONFIG).is_file():
        return Beit3ImageProcessor.from_pretrained(model_dir)
    return Beit3ImageProcessor(image_size, mode)


def text_length(model_dir: Path | None, default: int = 64) -> int:
    """Text length the model was trained with: ``processor_config.json``, else the run's ``max_text_len``."""
    if model_dir is None or not model_dir.is_dir():
        return default
    if (model_dir / PROCESSOR_CONFIG).is_file():
        return int(json.loads((model_dir / PROCESSOR_CONFIG).read_text(encoding="utf-8")).get("max_length", default))
    return int(run_setting(find_run_config(model_dir), "task", "options", "max_text_len") or default)
