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


def model_architecture(model_dir: str | os.PathLike) -> str | None:
    """The model class recorded in a model folder's ``config.json`` (None when there is none)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (json.JSONDecodeError, AttributeError):
        return None


def model_kind(architecture: str | None) -> tuple[str, Any]:
    """(what a model of ``architecture`` is for, in words; the catalogue task it serves or None)."""
    from beit3.catalogue import all_tasks

    spec = next((s for s in all_tasks().values()
                 if s.model_class is not None and s.model_class.__name__ == architecture), None)
    if spec is not None:
        return f"a {spec.name} model", spec
    if architecture == "Beit3Model":
        return "a pretrained backbone (no task head)", None
    return "an unknown kind of model", None


def check_model_kind(model_dir: str | os.PathLike, cls: type, task: str, advice: Any = None) -> None:
    """Refuse a model folder holding another task's model, in one line that names both:
    "model in DIR is a <kind> model (Beit3ForX); task <name> needs Beit3ForY". ``advice(spec)``
    adds what to run instead when the folder's model serves another task of the catalogue."""
    architecture = model_architecture(model_dir)
    if architecture is None or architecture == cls.__name__:
        return
    kind, spec = model_kind(architecture)
    hint = f": {advice(spec)}" if advice is not None and spec is not None else ""
    if spec is None and architecture == "Beit3Model":
        hint = f": fine-tune it first (`beit3 finetune`, task.name={task})"
    raise ValueError(f"model in {model_dir} is {kind} ({architecture}); task {task} needs {cls.__name__}{hint}")


CAPTION_DEFAULTS: dict[str, Any] = {"num_beams": 3, "max_length": 32, "length_penalty": 0.6, "min_length": 3}
"""Beam search settings of a captioning model without a training run (the release's)."""


def caption_settings(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Beam search settings of a captioning model: its training run's ``task.options`` (``num_beams``,
    ``length_penalty``, ``max_decode_len`` else ``max_text_len`` as ``max_length``, as ``beit3
    evaluate`` decodes), else :data:`CAPTION_DEFAULTS`."""
    settings = dict(CAPTION_DEFAULTS)
    if model_dir is None or not Path(model_dir).is_dir():
        return settings
    run = find_run_config(model_dir)
    found = {"num_beams": run_setting(run, "task", "options", "num_beams"),
             "length_penalty": run_setting(run, "task", "options", "length_penalty"),
             "max_length": run_setting(run, "task", "options", "max_decode_len")
             or run_setting(run, "task", "options", "max_text_len"),
             "min_length": run_setting(run, "task", "options", "min_decode_len")}
    casts = {"num_beams": int, "max_length": int, "length_penalty": float, "min_length": int}
    settings.update({key: casts[key](value) for key, value in found.items() if value is not None})
    return settings
