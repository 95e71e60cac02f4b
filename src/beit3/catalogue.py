"""The task catalogue: every task is declared once, by a :class:`TaskSpec` in its own module.

Everything that names a task reads it here: the engine (``task.name`` of a recipe), ``beit3
convert`` (its ``--task`` choices and head detection), ``beit3 evaluate`` (splits, index files,
the extra outputs of a task), ``beit3 predict`` and :func:`beit3.pipelines.pipeline` (verbs and
aliases), the image pipelines (``image_mode``) and the demo (index files). A new task is one
module: a task class carrying its ``spec`` and decorated with :func:`register_task`
(docs/adding-a-task.md).

The built-in tasks are registered by importing :mod:`beit3.tasks`; other packages add theirs
through the ``beit3.tasks`` entry-point group (each entry names a module to import).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

TaskKind = Literal["pretrain", "finetune"]
Reduction = Literal["sum", "max", "gather"]
"""How an evaluation statistic is combined over batches and processes: ``sum`` and ``max`` of
tensors (any shape: counts, sums, a confusion matrix), ``gather``: lists of picklable items
concatenated in rank order (predictions, embeddings moved to the CPU)."""

ENTRY_POINT_GROUP = "beit3.tasks"


@dataclass(frozen=True)
class TaskSpec:
    """Everything the rest of the system needs to know about one task."""

    name: str
    """Canonical name: ``task.name`` in recipes, ``--task`` of ``evaluate`` and ``convert``."""
    kind: TaskKind
    description: str = ""
    aliases: tuple[str, ...] = ()
    """Other names accepted wherever the canonical one is."""
    model_class: type | None = None
    """The model class (``beit3.models``) the task trains."""
    head_keys: tuple[str, ...] = ()
    """State-dict keys that all exist only in this task's checkpoints: ``beit3 convert`` picks the
    task whose keys are all present, the most specific one first."""
    image_mode: str | None = None
    """The official image pipeline: ``vl`` (squash resize, 0.5 mean/std) or ``imagenet``."""
    randaug: bool = False
    """RandAugment in the official training recipe."""
    index: str | None = None
    """Index file name pattern under ``data.root``: ``{split}`` and ``{prefix}`` (from ``datasets``)."""
    datasets: Mapping[str, str] = field(default_factory=dict)
    """``task.options.dataset`` -> ``{prefix}`` of ``index``; the first is the default."""
    train_splits: tuple[str, ...] = ("train",)
    eval_split: str | None = None
    """Validation split during training and the default of ``beit3 evaluate``."""
    splits: tuple[str, ...] = ()
    """The splits ``beit3 evaluate --split`` knows (besides the eval split)."""
    metric: str = ""
    """Statistic the best checkpoint is chosen on."""
    higher_is_better: bool = True
    statistics: Mapping[str, Reduction] = field(default_factory=dict)
    """What the task's ``eval_step`` returns per batch, and how the engine reduces each."""
    baseline: Callable[..., dict[str, Any]] | None = None
    """``baseline(spec, index_root) -> {"name", "value"}``: what a model that ignores the image
    scores on the eval split, computed from the index files (the demo prints it beside the task)."""
    probe_features: tuple[str, ...] = ()
    """What ``beit3 probe`` can pass through a frozen backbone for this task's labels (``image``,
    ``text``, ``pair``); the first is the default. Empty: the task has no linear probe."""
    evaluate_hook: Callable[..., dict[str, Any]] | None = None
    """``hook(task, stats, context) -> extra`` after ``beit3 evaluate`` (submission files,
    predictions to save, optional toolkits); see :mod:`beit3.tasks.commands`."""
    pipeline: str | None = None
    """``module:Class`` of the inference pipeline."""
    hub_pipeline_tag: str | None = None
    """The Hugging Face Hub's ``pipeline_tag`` for the task's model cards."""
    verb: str | None = None
    """``beit3 predict <verb>`` (also accepted by ``pipeline()``)."""
    predict: str | None = None
    """``module:function`` adding the ``beit3 predict <verb>`` sub-command: ``function(subparsers, spec)``."""
    task_class: Callable[..., Any] | None = None
    """Set by :func:`register_task`: the class the engine instantiates with the run config."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this task answers to."""
        return tuple(dict.fromkeys((self.name, *self.aliases, *((self.verb,) if self.verb else ()))))

    def index_file(self, split: str, dataset: str | None = None) -> str:
        """The index file of ``split`` (for ``dataset``, a key of ``datasets``)."""
        if self.index is None:
            raise ValueError(f"task '{self.name}' does not read index files")
        prefix = ""
        if self.datasets:
            dataset = dataset or next(iter(self.datasets))
            if dataset not in self.datasets:
                raise ValueError(f"task.options.dataset must be one of {sorted(self.datasets)}, got {dataset!r}")
            prefix = self.datasets[dataset]
        return self.index.format(split=split, prefix=prefix)

    def train_index(self, dataset: str | None = None) -> list[str]:
        return [self.index_file(split, dataset) for split in self.train_splits]

    def pipeline_class(self) -> type:
        if self.pipeline is None:
            raise ValueError(f"task '{self.name}' has no inference pipeline")
        return _resolve(self.pipeline)

    def predict_command(self) -> Callable[..., None]:
        if self.predict is None:
            raise ValueError(f"task '{self.name}' has no `beit3 predict` command")
        return _resolve(self.predict)


def _resolve(reference: str) -> Any:
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, TaskSpec] = {}
_LOADED = False


def register_task(cls: type) -> type:
    """Class decorator: add ``cls.spec`` to the catalogue (its ``task_class`` becomes ``cls``)."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"{cls.__name__} needs a class attribute spec = TaskSpec(...)")
    spec = replace(spec, task_class=cls)
    cls.spec = spec
    taken = {n: s for s in _REGISTRY.values() if s.name != spec.name for n in s.names}
    clash = [n for n in spec.names if n in taken]
    if clash:
        raise ValueError(f"task '{spec.name}': name {clash[0]!r} is already taken by task '{taken[clash[0]].name}'")
    old = _REGISTRY.get(spec.name)
    if old is not None and old.task_class is not None and old.task_class.__qualname__ != cls.__qualname__:
        raise ValueError(f"task '{spec.name}' is already registered by {old.task_class.__qualname__}")
    _REGISTRY[spec.name] = spec
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from beit3.tasks import BUILTIN_TASK_MODULES

    for module in BUILTIN_TASK_MODULES:  # each registers its tasks on import
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.partition(":")[0])


def all_tasks(kind: TaskKind | None = None) -> dict[str, TaskSpec]:
    """The catalogue, by canonical name (only ``kind`` when given)."""
    _load()
    return {name: spec for name, spec in _REGISTRY.items() if kind is None or spec.kind == kind}


def iter_tasks(kind: TaskKind | None = None, *, having: str | None = None) -> Iterator[TaskSpec]:
    """Specs in name order; ``having``: only those whose field of that name is set."""
    for _, spec in sorted(all_tasks(kind).items()):
        if having is None or getattr(spec, having):
            yield spec


def get_task(name: str, kind: TaskKind | None = None) -> TaskSpec:
    """The spec a name (canonical, alias or predict verb) stands for; an error lists the valid ones."""
    for spec in all_tasks().values():
        if name in spec.names:
            if kind is not None and spec.kind != kind:
                raise ValueError(f"task '{spec.name}' is a {spec.kind} task; use 'beit3 {spec.kind}'")
            return spec
    known = ", ".join(s.name for s in iter_tasks(kind)) or "none yet"
    raise KeyError(f"unknown task '{name}'; registered tasks: {known}")


def spec_for_model(cls: type) -> TaskSpec:
    """The task whose model class is ``cls`` (an error when none is, or several are)."""
    found = [spec for spec in iter_tasks() if spec.model_class is cls]
    if len(found) != 1:
        which = ", ".join(s.name for s in found) or "none"
        raise ValueError(f"{len(found)} tasks of the catalogue use {cls.__name__} ({which}); expected one")
    return found[0]
