"""The task protocol the engine trains and evaluates, and how a recipe's ``task.name`` becomes a task.

A task bundles what differs between VQA, retrieval, captioning, pretraining...: the model, the
datasets and their collate function, the loss and the per-batch evaluation statistics. The engine
never looks inside a batch; it asks the task, and it alone talks to other processes: it reduces
the statistics a task returns (see :mod:`beit3.training.evaluation`). Tasks are declared in the
catalogue (:mod:`beit3.catalogue`); a recipe may also name any factory as ``package.module:factory``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from beit3.catalogue import TaskKind, TaskSpec, get_task, register_task

if TYPE_CHECKING:
    from beit3.training.config import RunConfig
    from beit3.training.distributed import DistInfo

__all__ = ["TaskKind", "TaskSpec", "TrainStream", "TrainTask", "build_task", "register_task"]


@runtime_checkable
class TrainStream(Protocol):
    """A training set without a length (streamed shards), which ``build_datasets`` may return
    instead of a map-style dataset; the run then counts steps only (``schedule.max_steps``).

    The stream splits its data between processes (and data-loader workers) itself. Its
    ``state_dict()`` is one process's data position: a checkpoint keeps every process's, and
    ``load_state_dict`` receives that list on resume, before the first ``batches`` call.
    """

    def batches(self, micro_batch: int, *, num_workers: int, pin_memory: bool) -> Iterator[dict[str, Any]]:
        """Endless collated micro-batches for this process."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This process's position: what it consumed so far."""
        ...

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue after the positions of every process of the saved run."""
        ...


@runtime_checkable
class TrainTask(Protocol):
    """What the engine needs from a task.

    The model handed to ``train_step`` and ``eval_step`` may be wrapped (DDP) or sharded (FSDP2);
    call it, do not reach into its attributes. Optional methods the engine calls when present:
    ``setup(cfg, dist)`` (heavy set-up after the process group exists, see
    :meth:`beit3.training.loop.Trainer._setup`), ``num_tokens(batch)`` (the engine counts
    patches and text tokens otherwise) and ``frozen(step)`` (a predicate over the unwrapped model's
    parameter names, or None: those parameters' gradients are dropped before that optimiser step,
    as stage-wise pretraining freezes some experts).
    """

    spec: TaskSpec
    """The task's declaration: ``metric``, ``higher_is_better`` and ``statistics`` are read from it."""
    collate_fn: Callable[[list], dict[str, Any]]
    """Batches a list of dataset samples (training and evaluation; the engine adds ``is_padding``)."""

    def build_model(self, cfg: RunConfig) -> nn.Module:
        """The task model, on CPU in float32, following the optimizer protocol:
        ``no_weight_decay()``, ``layer_id(name)`` and ``config.num_layers``."""
        ...

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        """(train, validation) map-style datasets (the training set may be a :class:`TrainStream`).
        Validation must use evaluation transforms (the official script validated with training
        augmentation)."""
        ...

    def train_step(
        self, model: nn.Module, batch: dict[str, Any], *, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one micro-batch; return the scalar loss (mean over the micro-batch) and
        extra values to log (floats or 0-d tensors). ``step`` is the optimiser step, for losses
        that change over training (captioning drops the worst tokens after step 12000)."""
        ...

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Mapping[str, Any]:
        """Statistics of one validation batch, one entry per key of ``spec.statistics``: tensors
        for ``sum`` / ``max`` (left on the batch's device: no host sync), lists for ``gather``.
        The batch has a boolean ``is_padding`` tensor marking repeated samples not to count."""
        ...

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        """Metrics from the statistics summed (maxed, gathered) over every batch of every process."""
        ...


TaskFactory = Callable[["RunConfig"], TrainTask]


def build_task(cfg: RunConfig, kind: TaskKind | None = None) -> TrainTask:
    """Instantiate the task a config names, checking it is of the expected kind."""
    name = cfg.task.name
    if ":" in name:
        module_name, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    else:
        factory = get_task(name, kind).task_class
    task = factory(cfg)
    if not isinstance(task, TrainTask) or not isinstance(getattr(task, "spec", None), TaskSpec):
        raise TypeError(f"task '{name}' does not implement the TrainTask protocol (spec, build_model, "
                        "build_datasets, train_step, eval_step, compute_metrics)")
    return task


def setup_task(task: Any, cfg: RunConfig, dist: DistInfo) -> None:
    """Run a task's heavy set-up once the process group exists: ``setup(cfg, dist)`` on every
    process, after the main process has run it alone (so files it writes, such as a trained
    tokenizer, are made once and then read by the others)."""
    from beit3.training import distributed as D

    setup = getattr(task, "setup", None)
    if setup is None:
        return
    if dist.is_main:
        setup(cfg, dist)
    D.barrier()
    if not dist.is_main:
        setup(cfg, dist)
