"""The task protocol the loop trains, and the registry that maps recipe names to tasks.

A task bundles what differs between VQA, retrieval, captioning, pretraining...: the model, the
datasets, the loss and the metric. The loop never looks inside a batch; it asks the task. Wiring a
new task is one ``register_task`` call in a module listed in :data:`TASK_MODULES`, or no call at
all: a recipe may name any factory as ``package.module:factory``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from beit3.training.config import RunConfig

TaskKind = Literal["pretrain", "finetune"]


@runtime_checkable
class TrainTask(Protocol):
    """What the loop needs from a task.

    Batches are dicts of tensors (the dataset's samples collated by the default collate). The
    model handed to ``train_step`` and ``evaluate`` may be wrapped (DDP) or sharded (FSDP2);
    call it, do not reach into its attributes.
    """

    metric_name: str
    """Key of ``evaluate``'s result used to select the best checkpoint (e.g. ``vqa_score``)."""
    higher_is_better: bool

    def build_model(self, cfg: RunConfig) -> nn.Module:
        """The task model, on CPU in float32, following the optimizer protocol:
        ``no_weight_decay()``, ``layer_id(name)`` and ``config.num_layers``."""
        ...

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        """(train, validation) map-style datasets of dict samples. Validation must use
        evaluation transforms (the official script validated with training augmentation)."""
        ...

    def train_step(
        self, model: nn.Module, batch: dict[str, Any], *, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one micro-batch; return the scalar loss (mean over the micro-batch) and
        extra floats to log. ``step`` is the optimiser step, for losses that change over
        training (captioning drops the worst tokens after step 12000)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over the validation shard of this process, reduced over all processes
        (see ``beit3.training.distributed.all_reduce_sum``). Each batch has a boolean
        ``is_padding`` tensor marking repeated samples that must not be counted."""
        ...

    def num_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens (patches + text) in a micro-batch, for the tokens/s throughput figure."""
        ...


TaskFactory = Callable[["RunConfig"], TrainTask]


@dataclass(frozen=True)
class TaskEntry:
    name: str
    kind: TaskKind
    factory: TaskFactory
    description: str


_REGISTRY: dict[str, TaskEntry] = {}

TASK_MODULES: list[str] = [
    "beit3.tasks.classification",
    "beit3.tasks.vqav2",
    "beit3.tasks.nlvr2",
    "beit3.tasks.retrieval",
    "beit3.tasks.captioning",
    "beit3.tasks.segmentation",
    "beit3.tasks.detection",
    "beit3.pretraining.task",
]
"""Modules imported on first lookup; each calls :func:`register_task` for the tasks it defines.
Listing them here keeps ``import beit3.training`` from importing every task."""


def register_task(name: str, kind: TaskKind, factory: TaskFactory, description: str = "") -> None:
    """Make ``task.name: <name>`` in a recipe build its task with ``factory(cfg)``."""
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
        raise ValueError(f"task '{name}' is already registered")
    _REGISTRY[name] = TaskEntry(name=name, kind=kind, factory=factory, description=description)


def registered_tasks() -> dict[str, TaskEntry]:
    for module in TASK_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def build_task(cfg: RunConfig, kind: TaskKind | None = None) -> TrainTask:
    """Instantiate the task a config names, checking it is of the expected kind."""
    name = cfg.task.name
    if ":" in name:
        module_name, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    else:
        tasks = registered_tasks()
        if name not in tasks:
            known = ", ".join(sorted(t for t, e in tasks.items() if kind is None or e.kind == kind)) or "none yet"
            raise KeyError(f"unknown task '{name}'; registered tasks: {known}")
        entry = tasks[name]
        if kind is not None and entry.kind != kind:
            raise ValueError(f"task '{name}' is a {entry.kind} task; use 'beit3 {entry.kind}'")
        factory = entry.factory
    task = factory(cfg)
    if not isinstance(task, TrainTask):
        raise TypeError(f"task '{name}' does not implement the TrainTask protocol")
    return task
