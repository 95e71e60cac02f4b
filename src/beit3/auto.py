"""Load any supported checkpoint as the right model class: ``beit3.load_model(path_or_repo)``.

Sources: our folder (``config.json`` + ``model.safetensors``, its ``architecture`` names the class),
a checkpoint file of the official release or timm, a folder in another layout that
:mod:`beit3.models.convert` reads, or a Hugging Face Hub repository (``"org/name"``, through
``huggingface_hub`` when installed). For files without our ``config.json`` the task is detected from
the head keys, as ``beit3 convert`` does (:func:`detect_task`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from beit3.models.base import CONFIG_NAME, Beit3PreTrainedModel, CheckpointError


def model_classes() -> dict[str, type[Beit3PreTrainedModel]]:
    """Every model class by name: the package's own and those of the catalogue's tasks (plugins)."""
    from beit3 import models
    from beit3.catalogue import iter_tasks

    found = {name: value for name, value in vars(models).items()
             if isinstance(value, type) and issubclass(value, Beit3PreTrainedModel)}
    for spec in iter_tasks():
        if spec.model_class is not None:
            found.setdefault(spec.model_class.__name__, spec.model_class)
    return found


def detect_task(state: dict[str, Any]) -> str:
    """Which task a (task-form) state dict was trained for: the task whose declared head keys are all
    present, the one with the most keys first (NLVR2's head sits beside a pooler, for instance);
    ``backbone`` when none fits."""
    from beit3.catalogue import iter_tasks

    fitting = [spec for spec in iter_tasks("finetune", having="head_keys") if all(k in state for k in spec.head_keys)]
    if not fitting:
        return "backbone"
    most = max(len(spec.head_keys) for spec in fitting)
    best = [spec for spec in fitting if len(spec.head_keys) == most]
    if len(best) > 1:
        raise ValueError(f"the checkpoint's head keys fit the tasks {', '.join(s.name for s in best)}; pass task=")
    return best[0].name


def class_for_task(task: str) -> type[Beit3PreTrainedModel]:
    from beit3.catalogue import get_task
    from beit3.models import Beit3Model

    if task == "backbone":
        return Beit3Model
    cls = get_task(task).model_class
    if cls is None:
        raise ValueError(f"task '{task}' declares no model class")
    return cls


def saved_architecture(folder: Path) -> str | None:
    """The ``architecture`` of our ``config.json`` in ``folder`` (None when it is not our format)."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if isinstance(saved, dict) and "config" in saved:
        return str(saved.get("architecture", "Beit3Model"))
    return None


def resolve_class(path: Path, task: str | None = None) -> type[Beit3PreTrainedModel]:
    """The class ``path`` holds: ``task`` when given, our config's architecture, else the head keys."""
    if task is not None:
        return class_for_task(task)
    if path.is_dir():
        architecture = saved_architecture(path)
        if architecture is not None:
            cls = model_classes().get(architecture)
            if cls is None:
                raise CheckpointError(f"{path / CONFIG_NAME}: unknown architecture {architecture!r}; "
                                      "is the package that defines it installed?")
            return cls
    from beit3.models.convert import read_state_dict, resolve_checkpoint, to_task_form

    weights, _ = resolve_checkpoint(path)
    state, _ = to_task_form(read_state_dict(weights))
    return class_for_task(detect_task(state))


def load_model(path_or_repo: str | os.PathLike, *, task: str | None = None, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
               token: str | bool | None = None, **overrides: Any) -> Beit3PreTrainedModel:
    """The model in ``path_or_repo`` as its own class (``Beit3ForCaptioning``, ``Beit3Model`` ...).

    task: force the task (a catalogue name, or ``"backbone"``) instead of detecting it.
    revision, cache_dir, local_files_only, token: for Hub repositories (``HF_HUB_OFFLINE=1`` reads only
        the cache).
    overrides: passed to ``from_pretrained`` (config fields such as ``image_size=``, ``init_head=``).
    """
    from beit3.hub import resolve

    path = resolve(path_or_repo, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                   token=token)
    cls = resolve_class(path, task)
    return cls.from_pretrained(path, **overrides)


class Beit3AutoModel:
    """``Beit3AutoModel.from_pretrained(path_or_repo)``: :func:`load_model` under the name Hugging Face
    users reach for."""

    def __init__(self) -> None:
        raise TypeError("Beit3AutoModel is not instantiated; use Beit3AutoModel.from_pretrained(path_or_repo)")

    @staticmethod
    def from_pretrained(path_or_repo: str | os.PathLike, **options: Any) -> Beit3PreTrainedModel:
        return load_model(path_or_repo, **options)
