"""The training loop: one implementation for every task, one process or many.

Order of construction follows torchtitan: build the single-device model (same seed on every
process), apply activation checkpointing, then FSDP2 per block and root (or DDP), then the
optimizer over the model's own parameter names, then restore a checkpoint if asked. The loop knows
nothing about the objective: the task maps a batch to ``(loss, logs)``.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader

from beit3.data.datasets import merge_skip_counts
from beit3.io import atomic_write, atomic_write_text
from beit3.training import checkpoint as ckpt
from beit3.training import distributed as D
from beit3.training.config import RunConfig, resolve_paths
from beit3.training.logging import RunLogger, format_summary, logger, setup_console_logging
from beit3.training.evaluation import count_tokens, evaluate_batches
from beit3.training.optim import WarmupCosineSchedule, WeightEma, param_groups
from beit3.training.task import TrainStream, TrainTask, setup_task

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """How a run ended, returned by :meth:`Trainer.fit` (also written to ``summary.json``)."""

    stop_reason: str
    """``completed``, ``signal`` (SIGTERM/SIGINT, checkpoint written) or ``nonfinite``."""
    step: int
    best_step: int | None = None
    best_value: float | None = None
    last_checkpoint: Path | None = None
    signal_number: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _adamw_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's fused kernel where it applies (plain CPU or CUDA float tensors): on the tiny model's 85
    tensors it takes 0.9 ms a step against 5.0 for the per-tensor loop, the same values to 6e-8.
    FSDP2's DTensor shards keep PyTorch's default."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a PyTorch built without distributed support
        DTensor = ()  # noqa: N806
    usable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor)
                 for p in params)
    return {"fused": True} if params and usable else {}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _optimizer_names(flat_state: dict[str, Any]) -> dict[str, Any]:
    """``{"param_groups": [{"params": names}], "state": {name: {}}}`` of a flattened optimizer state
    dict (keys ``state.<name>.<field>`` / ``param_groups.<name>.<option>``), for
    :func:`beit3.training.checkpoint.check_optimizer_state`."""
    grouped = [key.split(".", 1)[1].rsplit(".", 1)[0] for key in flat_state if key.startswith("param_groups.")]
    with_state = [key.split(".", 1)[1].rsplit(".", 1)[0] for key in flat_state if key.startswith("state.")]
    return {"param_groups": [{"params": list(dict.fromkeys(grouped))}],
            "state": {name: {} for name in dict.fromkeys(with_state)}}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "summary.json", "run.yaml", "tensorboard")
"""What a run writes into its ``train.output_dir`` (``train.overwrite`` deletes exactly these)."""


def previous_run_files(output_dir: Path) -> list[Path]:
    """The results of a run already in ``output_dir``: its checkpoints, ``final/``, ``summary.json``.
    (A run killed before its first checkpoint left nothing to resume; a fresh run replaces it.)"""
    found = []
    if ckpt.list_checkpoints(output_dir / "checkpoints"):
        found.append(output_dir / "checkpoints")
    found += [output_dir / name for name in ("final", "summary.json") if (output_dir / name).exists()]
    return found


def clear_previous_run(output_dir: Path) -> None:
    """Delete the files a run wrote (:data:`RUN_FILES`), checkpoints first so that a failure half-way
    never leaves a resumable mix; anything else in the folder stays."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


TEXT_LENGTH_OPTIONS = ("max_text_len", "text_length", "caption_length", "max_decode_len")
"""``task.options`` keys giving a number of text tokens, checked against the model's position table."""


def check_text_lengths(model: torch.nn.Module, task: Any, cfg: RunConfig) -> None:
    """Fail at the start, not at the first batch, when a text length is longer than the model's text
    position table holds."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_text_length", None)
    if not isinstance(limit, int):
        return
    options = getattr(task, "options", None)
    options = options if isinstance(options, dict) else cfg.task.options
    for key in TEXT_LENGTH_OPTIONS:
        value = options.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            where = ("the pretrained model's" if cfg.model.pretrained else "model.config") + \
                f" max_text_positions={config.max_text_positions}"
            raise ValueError(f"task.options.{key}={value} is longer than the text position table holds: {where} "
                             f"fits {limit} text tokens (2 rows are unused); set task.options.{key} to at most {limit}")


class Trainer:
    """Runs one :class:`RunConfig` with one :class:`TrainTask`.

    ``fit()`` initialises ``torch.distributed`` from the torchrun environment when present, so
    the same call works in a test process, under ``torchrun --nproc_per_node 8`` and across nodes.
    """

    def __init__(self, cfg: RunConfig, task: TrainTask) -> None:
        cfg.validate()
        resolve_paths(cfg)  # run.yaml then means the same from any working folder
        self.cfg = cfg
        self.task = task
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------- setup

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = D.init_distributed(cfg.parallel.timeout_minutes)
        setup_console_logging(self.dist.is_main)
        self.threads = D.configure_threads(cfg.train.threads)
        self._prepare_output_dir()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        world, rank = self.dist.world_size, self.dist.rank

        # Heavy task set-up (tokenizers) now that the process group exists: once, main process first.
        setup_task(self.task, cfg, self.dist)
        # Same seed on every process while building, so replicas (and FSDP shards) agree.
        seed_everything(cfg.train.seed)
        meta_init = world > 1 and cfg.parallel.strategy == "fsdp" and cfg.parallel.meta_init
        model = D.build_on_main(lambda: self.task.build_model(cfg), self.dist) if meta_init \
            else self.task.build_model(cfg).to(self.dist.device)
        check_text_lengths(model, self.task, cfg)
        self.patch_size = int(getattr(getattr(model, "config", None), "patch_size", 16))
        self.train_set, self.val_set = self.task.build_datasets(cfg)
        seed_everything(cfg.train.seed + rank)

        micro = cfg.data.micro_batch_size or cfg.data.batch_size // world
        if micro <= 0 or cfg.data.batch_size % (micro * world):
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} must be a multiple of micro_batch_size ({micro}) "
                f"x world size ({world})"
            )
        self.micro_batch = micro
        self.accum_steps = cfg.data.batch_size // (micro * world)
        self.streaming = isinstance(self.train_set, TrainStream)
        if self.streaming and cfg.data.train_fraction < 1:
            raise ValueError("data.train_fraction needs a training set with a length; these data are streamed")
        if self.streaming:  # no length: one "epoch" is the whole run
            if not cfg.schedule.max_steps:
                raise ValueError("the training data are streamed and have no length: set schedule.max_steps")
            if cfg.schedule.warmup_steps is None and cfg.schedule.warmup_epochs:
                raise ValueError("the training data are streamed and have no epochs: set schedule.warmup_steps "
                                 "instead of schedule.warmup_epochs")
            self.sampler = None
            self.steps_per_epoch = cfg.schedule.max_steps
        else:
            self.sampler = D.TrainSampler(len(self.train_set), cfg.data.batch_size, rank, world, cfg.train.seed,
                                          fraction=cfg.data.train_fraction)
            self.steps_per_epoch = self.sampler.batches_per_epoch
            if self.steps_per_epoch == 0:
                raise ValueError(f"the training set ({self.sampler.num_samples} of {len(self.train_set)} with "
                                 f"data.train_fraction={cfg.data.train_fraction}) is smaller than one batch "
                                 f"({cfg.data.batch_size})")
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        warmup = cfg.schedule.warmup_steps
        if warmup is None:
            warmup = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        if warmup > self.total_steps:
            # e.g. schedule.max_steps=40 with the recipe's warmup of a whole epoch: the run would never
            # leave the warmup ramp (nor reach the peak learning rate)
            logger.warning("warmup of %d steps is longer than the run (%d steps): warming up over the whole run "
                           "instead; set schedule.warmup_steps to choose", warmup, self.total_steps)
            warmup = self.total_steps

        self.autocast_dtype = _DTYPES[cfg.train.precision]
        blocks = D.find_blocks(model, cfg.parallel.block_lists)
        if cfg.parallel.activation_checkpointing:
            D.apply_activation_checkpointing(blocks)
        if cfg.train.compile:  # per block, after checkpointing and before FSDP2 / DDP, as torchtitan
            if not blocks:
                raise ValueError("train.compile: the model has no blocks to compile (no ModuleList named 'layers'; "
                                 "set parallel.block_lists)")
            D.apply_compile(blocks)
        self.raw_model = model
        self.strategy = "single"
        if world > 1 and cfg.parallel.strategy == "fsdp":
            full_state = dict(model.state_dict()) if meta_init and self.dist.is_main else None
            D.apply_fsdp(
                model,
                blocks,
                device=self.dist.device,
                param_dtype=None if cfg.train.precision == "fp32" else self.autocast_dtype,
                reshard_after_forward=cfg.parallel.reshard_after_forward,
            )
            if meta_init:
                D.materialize_from_main(model, full_state, self.dist.device)
                del full_state
            self.model = model
            self.strategy = "fsdp"
        elif world > 1:
            self.model = D.apply_ddp(model, self.dist.device, cfg.parallel.find_unused_parameters)
            self.strategy = "ddp"
        else:
            self.model = model

        groups = param_groups(
            self.raw_model,
            weight_decay=cfg.optim.weight_decay,
            layer_decay=cfg.optim.layer_decay,
            head_lr_scale=cfg.optim.head_lr_scale,
        )
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                           **_adamw_kernel(self.params))
        self.schedule = WarmupCosineSchedule(
            self.optimizer,
            base_lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            warmup_lr=cfg.optim.warmup_lr,
            warmup_steps=warmup,
            total_steps=self.total_steps,
        )
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=cfg.train.precision == "fp16")
        self.ema = WeightEma(self.raw_model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None

        self.step = 0
        self._frozen: tuple[Any, list[torch.nn.Parameter]] = (None, [])  # see _drop_frozen_grads
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.best: dict[str, Any] | None = None
        self._pending_checkpoint: ckpt.PendingCheckpoint | None = None  # train.async_checkpoint
        self._async_group: Any = None  # its gloo group, made at the first background save
        self._maybe_resume()

    def _prepare_output_dir(self) -> None:
        """Refuse to start a fresh run over another run's results (unless ``train.overwrite``, which
        deletes them first): appending to its metrics, overwriting its ``final/`` and later resuming
        its checkpoints would mix two runs. Resuming (``train.resume``) continues the run that is there."""
        problem = None
        if self.dist.is_main and self.cfg.train.resume is None:
            previous = previous_run_files(self.output_dir)
            if previous and self.cfg.train.overwrite:
                logger.info("train.overwrite: deleting the previous run's %s in %s",
                            ", ".join(p.name for p in previous), self.output_dir)
                clear_previous_run(self.output_dir)
            elif previous:
                problem = (f"{self.output_dir} already holds a run ({', '.join(p.name for p in previous)}); "
                           "pass --resume auto to continue it, --overwrite to delete it and start afresh, "
                           "or choose another --output-dir")
        problem = D.broadcast_object(problem)
        if problem:
            raise ValueError(problem)
        D.barrier()

    def _resume_path(self) -> Path | None:
        choice = self.cfg.train.resume
        if choice is None:
            return None
        if choice == "auto":
            found = ckpt.find_resumable(self.checkpoint_root) if self.dist.is_main else None
            found = D.broadcast_object(found)
            if found is None:
                logger.info("resume=auto: no checkpoint in %s, starting fresh", self.checkpoint_root)
            return found  # type: ignore[return-value]
        path = Path(choice)
        if self.dist.is_main:
            ckpt.verify_checkpoint(path)
        return path

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        state = self._load_sharded(path) if ckpt.is_sharded(path) else self._load_full(path)
        self._restore_trainer_state(path, state)

    def _load_full(self, path: Path) -> dict[str, Any]:
        """Model, EMA and optimizer from a full checkpoint (every process reads the whole files)."""
        model_state, state, ema_state = ckpt.load_checkpoint(path)
        load_opts = StateDictOptions(full_state_dict=True)
        if self.ema is not None and ema_state is not None:
            # Load the averaged weights through the model so FSDP shards them like parameters.
            self.ema.swap(self.raw_model)
            set_model_state_dict(self.raw_model, ema_state, options=load_opts)
            self.ema.swap(self.raw_model)
        set_model_state_dict(self.raw_model, model_state, options=load_opts)
        # Parameters that never received a gradient (text embeddings in image-only fine-tuning) have no
        # optimizer state: check the rest matches exactly, then let torch accept those without state.
        names: dict[int, list[str]] = {}
        for name, param in self.raw_model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        trainable = [names[id(p)][0] for group in self.optimizer.param_groups for p in group["params"]]
        aliases = {alias: known[0] for known in names.values() for alias in known[1:]}
        stateless = ckpt.check_optimizer_state(trainable, state["optimizer"], aliases)
        if stateless:
            logger.info("resume: %d parameter(s) never received a gradient and have no optimizer state (e.g. %s)",
                        len(stateless), stateless[0])
        set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # torch initialises every state with a zero-gradient step before loading; drop that for the
        # parameters without saved state, so they stay as they were (AdamW starts them at their first
        # gradient), exactly as in the run that wrote the checkpoint.
        by_name = dict(self.raw_model.named_parameters())
        for name in stateless:
            self.optimizer.state.pop(by_name[name], None)
        return state

    def _restore_trainer_state(self, path: Path, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.best = state["best"]
        if "data_skipped" in state and callable(getattr(self.task, "load_skipped_samples", None)):
            # The counts of all processes continue on the main one (totals stay right on any world size).
            self.task.load_skipped_samples(state["data_skipped"] if self.dist.is_main else {})
        if self.streaming:
            if "data_stream" in state:
                self.train_set.load_state_dict(state["data_stream"])
            else:
                logger.warning("the checkpoint holds no stream position (it was saved from map-style data): "
                               "the streamed data start from the beginning")
        if state["global_batch"] != self.cfg.data.batch_size:
            logger.warning("resuming with batch %d instead of %d: the data position is approximate",
                           self.cfg.data.batch_size, state["global_batch"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            ckpt.restore_rng_state(rng[self.dist.rank])
        else:
            logger.warning("checkpoint has RNG states for %d processes, this run has %d: reseeding",
                           len(rng), self.dist.world_size)
            seed_everything(self.cfg.train.seed + self.dist.rank + self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Gather full state on the main process and write a checkpoint (collective call); with
        ``train.checkpoint_format: sharded`` every process writes its own shards instead."""
        if self.cfg.train.checkpoint_format == "sharded":
            return self._save_sharded()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.raw_model, options=opts)
        optim_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        ema_state = None
        if self.ema is not None:
            self.ema.swap(self.raw_model)
            # Unsharded models return their own tensors here; copy before swapping back.
            ema_state = {k: v.clone() for k, v in get_model_state_dict(self.raw_model, options=opts).items()}
            self.ema.swap(self.raw_model)
        rng = D.all_gather_objects(ckpt.capture_rng_state())
        skipped = self._skipped_everywhere()
        positions = self._stream_positions()
        path = None
        if self.dist.is_main:
            trainer_state = {**self._trainer_state(rng, skipped, positions), "optimizer": optim_state}
            texts = {"run.yaml": self.cfg.to_yaml()}
            model_config = self._model_config_json()
            if model_config is not None:
                texts["config.json"] = model_config
            path = ckpt.save_checkpoint(
                self.checkpoint_root, self.step, model_state=model_state, trainer_state=trainer_state,
                ema_state=ema_state, text_files=texts,
            )
            if self.best is not None and self.best["step"] == self.step:
                ckpt.write_best(self.checkpoint_root, self.step, self.task.spec.metric, self.best["value"])
            ckpt.prune_checkpoints(self.checkpoint_root, self.cfg.train.keep_last)
        D.barrier()
        return path

    def _stream_positions(self) -> list[dict[str, Any]] | None:
        """Every process's position in a streamed training set (collective); None for map-style data."""
        return D.all_gather_objects(self.train_set.state_dict()) if self.streaming else None

    def _trainer_state(self, rng: list[Any], skipped: dict[str, Any] | None,
                       positions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What a checkpoint holds besides the tensors of the model and the optimizer."""
        state = {
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "global_batch": self.cfg.data.batch_size,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "best": self.best,
        }
        if skipped is not None:
            state["data_skipped"] = skipped
        if positions is not None:
            state["data_stream"] = positions
        return state

    def _wait_for_checkpoint(self) -> Path | None:
        """Block until the checkpoint being written in the background (if any) is in place."""
        pending, self._pending_checkpoint = self._pending_checkpoint, None
        return None if pending is None else pending.wait()

    def _checkpoint_group(self) -> Any:
        """The gloo group of background checkpoint writes (created once, by every process together)."""
        if self._async_group is None and torch.distributed.is_initialized():
            self._async_group = torch.distributed.new_group(backend="gloo")
        return self._async_group

    def _save_sharded(self) -> Path | None:
        """Every process writes its shards with DCP; nothing is gathered (collective call). With
        ``train.async_checkpoint`` the writing goes on in the background (see save_sharded_checkpoint)."""
        self._wait_for_checkpoint()  # one save in flight at a time
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        optim_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        state: dict[str, Any] = {"model": get_model_state_dict(self.raw_model), "optim": optim_state}
        if self.ema is not None:
            self.ema.swap(self.raw_model)
            state["ema"] = {k: v.clone() for k, v in get_model_state_dict(self.raw_model).items()}
            self.ema.swap(self.raw_model)
        rng = D.all_gather_objects(ckpt.capture_rng_state())
        skipped = self._skipped_everywhere()
        positions = self._stream_positions()
        trainer_state = texts = None
        if self.dist.is_main:
            trainer_state = self._trainer_state(rng, skipped, positions)
            # The optimizer's parameter names (plain strings), to check a resume against before loading.
            trainer_state["optimizer_names"] = _optimizer_names(optim_state)
            texts = {"run.yaml": self.cfg.to_yaml()}
            model_config = self._model_config_json()
            if model_config is not None:
                texts["config.json"] = model_config
        best = self.best is not None and self.best["step"] == self.step
        step, metric, value = self.step, self.task.spec.metric, self.best["value"] if best else None

        def in_place(_: Path) -> None:  # the main process, once the folder is complete
            if best:
                ckpt.write_best(self.checkpoint_root, step, metric, value)
            ckpt.prune_checkpoints(self.checkpoint_root, self.cfg.train.keep_last)

        if self.cfg.train.async_checkpoint:
            self._pending_checkpoint = ckpt.save_sharded_checkpoint(
                self.checkpoint_root, self.step, state=state, trainer_state=trainer_state, text_files=texts,
                is_main=self.dist.is_main, barrier=D.barrier, asynchronous=True,
                process_group=self._checkpoint_group(), on_complete=in_place if self.dist.is_main else None)
            return self._pending_checkpoint.final if self.dist.is_main else None
        path = ckpt.save_sharded_checkpoint(self.checkpoint_root, self.step, state=state, trainer_state=trainer_state,
                                            text_files=texts, is_main=self.dist.is_main, barrier=D.barrier,
                                            on_complete=in_place if self.dist.is_main else None)
        D.barrier()
        return path

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """Model, EMA and optimizer from a DCP checkpoint, re-sharded onto this run's processes."""
        state = ckpt.load_trainer_state(path)
        names: dict[int, list[str]] = {}
        for name, param in self.raw_model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        trainable = [names[id(p)][0] for group in self.optimizer.param_groups for p in group["params"]]
        aliases = {alias: known[0] for known in names.values() for alias in known[1:]}
        stateless = ckpt.check_optimizer_state(trainable, state["optimizer_names"], aliases)
        saved = ckpt.sharded_keys(path)
        if self.ema is not None and any(key.startswith("ema.") for key in saved):
            self.ema.swap(self.raw_model)
            target = {"ema": get_model_state_dict(self.raw_model)}
            ckpt.load_sharded(path, target)
            set_model_state_dict(self.raw_model, target["ema"])
            self.ema.swap(self.raw_model)
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        optim_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        # Parameters that never had a gradient have no saved moments: load everything else.
        optim_state = {k: v for k, v in optim_state.items() if not k.startswith("state.") or f"optim.{k}" in saved}
        target = {"model": get_model_state_dict(self.raw_model), "optim": optim_state}
        ckpt.load_sharded(path, target)
        set_model_state_dict(self.raw_model, target["model"])
        set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state_dict=target["optim"],
                                 options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))
        by_name = dict(self.raw_model.named_parameters())
        for name in stateless:
            self.optimizer.state.pop(by_name[name], None)
        if stateless:
            logger.info("resume: %d parameter(s) never received a gradient and have no optimizer state (e.g. %s)",
                        len(stateless), stateless[0])
        return state

    def _model_config_json(self) -> str | None:
        """The model's own config, so a checkpoint folder is also a ``from_pretrained`` folder."""
        own_format = getattr(self.raw_model, "config_json", None)  # beit3 models: architecture + head too
        if callable(own_format):
            return own_format()
        config = getattr(self.raw_model, "config", None)
        to_json = getattr(config, "to_json_string", None)
        return to_json() if callable(to_json) else None

    # ------------------------------------------------------------------ steps

    def _epoch_batches(self, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        if self.streaming:  # the stream resumes itself (load_state_dict at resume)
            for batch in self.train_set.batches(self.micro_batch, num_workers=self.cfg.data.num_workers,
                                                pin_memory=self.dist.device.type == "cuda"):
                yield _to_device(batch, self.dist.device)
            return
        self.sampler.set_position(epoch, start_batch)
        set_epoch = getattr(self.train_set, "set_epoch", None)
        if callable(set_epoch):  # datasets whose random draws depend on the epoch (before the workers start)
            set_epoch(epoch)
        generator = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)
        loader = DataLoader(
            self.train_set,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            generator=generator,
            drop_last=False,
            collate_fn=getattr(self.task, "collate_fn", None),
        )
        for batch in loader:
            yield _to_device(batch, self.dist.device)

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.strategy == "ddp" and not enabled:
            return self.model.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float] | None:
        """One optimiser step over ``accum_steps`` micro-batches; None when the loss was non-finite.

        All processes always run forward and backward (even on a bad loss) so collectives stay
        matched; a non-finite loss anywhere discards the step everywhere.
        """
        self.model.train()
        device = self.dist.device
        log_keys: list[str] | None = None
        totals: torch.Tensor | None = None
        for micro in range(self.accum_steps):
            batch = next(batches)
            with self._grad_sync(micro == self.accum_steps - 1):
                with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32):
                    loss, logs = self.task.train_step(self.model, batch, step=self.step)
                self.scaler.scale(loss / self.accum_steps).backward()
            finite = bool(torch.isfinite(loss.detach()).item())
            if log_keys is None:
                log_keys = sorted(logs)
            values = [loss.detach().float().item() if finite else 0.0, 0.0 if finite else 1.0,
                      float(self._num_tokens(batch))] + [float(logs[k]) for k in log_keys]
            part = torch.tensor(values, dtype=torch.float64)
            totals = part if totals is None else totals + part
        stop = 1.0 if self._stop_signal is not None else 0.0
        packed = torch.cat([totals, torch.tensor([stop], dtype=torch.float64)]).to(device)
        packed = D.all_reduce_sum(packed).cpu()
        if packed[-1] > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another process was signalled
        count = self.accum_steps * self.dist.world_size
        nonfinite = packed[1].item() > 0
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._drop_frozen_grads()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        out = {"loss": packed[0].item() / count, "grad_norm": float(grad_norm), "tokens": packed[2].item()}
        out.update({k: packed[3 + i].item() / count for i, k in enumerate(log_keys or [])})
        if self.scaler.is_enabled():
            out["loss_scale"] = float(self.scaler.get_scale())
        return out

    def _drop_frozen_grads(self) -> None:
        """Parameters the task freezes at this step (optional ``task.frozen(step)``: a predicate over
        parameter names, e.g. a pretraining stage's) lose their gradients before the update, so AdamW
        leaves them, their moments and their weight decay alone. Found once per predicate."""
        frozen = getattr(self.task, "frozen", None)
        predicate = frozen(self.step) if frozen is not None else None
        if predicate is None:
            return
        if predicate != self._frozen[0]:
            self._frozen = (predicate, [p for n, p in self.raw_model.named_parameters() if predicate(n)])
        for param in self._frozen[1]:
            param.grad = None

    def _skipped_everywhere(self) -> dict[str, dict[str, int]] | None:
        """Bad samples skipped by all processes, source -> shard -> count, for tasks that count them
        (``task.skipped_samples()``); collective."""
        own = getattr(self.task, "skipped_samples", None)
        if not callable(own):
            return None
        return merge_skip_counts(D.all_gather_objects(own()))

    def _skip_totals(self) -> dict[str, float]:
        """``skipped_<source>``: bad samples skipped so far by all processes (collective)."""
        own = getattr(self.task, "skipped_samples", None)
        if not callable(own):
            return {}
        counts = own()
        names = sorted(counts)
        totals = torch.tensor([float(sum(counts[n].values())) for n in names], dtype=torch.float64)
        totals = D.all_reduce_sum(totals.to(self.dist.device)).cpu()
        return {f"skipped_{name}": totals[i].item() for i, name in enumerate(names)}

    def _num_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens in a micro-batch (the task's own count when it has one), for tokens/s."""
        own = getattr(self.task, "num_tokens", None)
        return own(batch) if callable(own) else count_tokens(batch, self.patch_size)

    # ------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float] | None:
        """Run the task's metric on the validation split (EMA weights when enabled)."""
        if self.val_set is None:
            return None
        sampler = D.EvalSampler(len(self.val_set), self.dist.rank, self.dist.world_size)
        loader = DataLoader(
            D.EvalDataset(self.val_set),
            batch_size=self.cfg.data.eval_batch_size or self.micro_batch,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=D.EvalCollate(getattr(self.task, "collate_fn", None)),
        )
        device = self.dist.device
        if self.ema is not None:
            self.ema.swap(self.raw_model)
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=self.autocast_dtype,
                                                 enabled=self.autocast_dtype != torch.float32):
                metrics, _ = evaluate_batches(self.task, self.model, (_to_device(b, device) for b in loader), device)
        finally:
            self.model.train()
            if self.ema is not None:
                self.ema.swap(self.raw_model)
        return metrics

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.task.spec.higher_is_better else value < self.best["value"]

    # ------------------------------------------------------------------- main

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum
        # A second Ctrl-C stops at once, without waiting for the checkpoint.
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (or until stopped); always leaves a resumable checkpoint."""
        self._setup()
        cfg = self.cfg
        is_main = self.dist.is_main
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "run.yaml", cfg.to_yaml())
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        run_log = RunLogger(self.output_dir, enabled=is_main, total_steps=self.total_steps,
                            start_step=self.step, progress_bar=cfg.train.progress_bar)
        per_epoch = "streamed data" if self.streaming else f"{self.steps_per_epoch}/epoch"
        if not self.streaming and self.sampler.indices is not None:
            per_epoch += f" of {self.sampler.num_samples} of the {len(self.train_set)} training samples"
        run_log.message(
            f"{self.strategy} x{self.dist.world_size} on {self.dist.device.type}: {self.total_steps} steps "
            f"({per_epoch}), batch {cfg.data.batch_size} = {self.micro_batch} micro x "
            f"{self.accum_steps} accum x {self.dist.world_size} procs, {sum(p.numel() for p in self.params):,} "
            f"trainable parameters"
        )
        eval_every = cfg.train.eval_every or self.steps_per_epoch
        save_every = cfg.train.checkpoint_every or self.steps_per_epoch
        start_step, started = self.step, time.perf_counter()
        last: dict[str, float] = {}
        stop_reason = "completed"
        last_path = None
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
        try:
            while self.step < self.total_steps and stop_reason == "completed":
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                batches = self._epoch_batches(epoch, offset)
                for _ in range(offset, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    lr = self.schedule.current_lr
                    out = self._train_step(batches)
                    self.step += 1
                    self.schedule.step()
                    saved = False
                    if out is None:
                        self.nonfinite_total += 1
                        self.nonfinite_run += 1
                        run_log.message(f"step {self.step}: non-finite loss, update skipped "
                                        f"({self.nonfinite_run} in a row)")
                        run_log.log("train", self.step, {"nonfinite": 1.0, "lr": lr})
                    else:
                        self.nonfinite_run = 0
                        last = out
                        window_steps += 1
                        window_tokens += out.pop("tokens")
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        samples_s = window_steps * cfg.data.batch_size / elapsed
                        tokens_s = window_tokens / elapsed
                        if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                            run_log.log("train", self.step, {**out, "lr": lr, "samples_per_s": samples_s,
                                                             "tokens_per_s": tokens_s, "epoch": epoch,
                                                             **self._skip_totals()})
                            window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
                        run_log.progress(1, {"loss": f"{out['loss']:.4f}", "lr": f"{lr:.2e}",
                                             "samples/s": f"{samples_s:.1f}", "tok/s": f"{tokens_s:.0f}"})
                    if self.nonfinite_run >= cfg.train.max_nonfinite_steps:
                        stop_reason = "nonfinite"
                    elif self._stop_signal is not None:
                        stop_reason = "signal"
                    done = self.step == self.total_steps
                    if self.step % eval_every == 0 or done:
                        metrics = self.evaluate()
                        if metrics is not None:
                            value = metrics[self.task.spec.metric]
                            run_log.log("val", self.step, metrics)
                            run_log.message(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                            if self._is_better(value):
                                self.best = {"step": self.step, "value": value}
                                last_path = self.save()
                                saved = True
                    if not saved and (self.step % save_every == 0 or done or stop_reason != "completed"):
                        last_path = self.save()
                    if stop_reason != "completed":
                        break
            self._wait_for_checkpoint()  # the last checkpoint is in place before the run reports done
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            run_log.close()
            if self._pending_checkpoint is not None:  # leaving on an error
                try:
                    self._wait_for_checkpoint()
                except Exception:  # the error already propagating is the one to report
                    logger.exception("the checkpoint being written in the background failed too")
        if stop_reason == "completed" and is_main:
            self._export_final()
        wall = time.perf_counter() - started
        summary = {
            "stop_reason": stop_reason,
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "samples_seen": self.step * cfg.data.batch_size,
            "wall_time_s": round(wall, 2),
            "samples_per_s": round((self.step - start_step) * cfg.data.batch_size / max(wall, 1e-9), 2),
            "final_train_loss": last.get("loss"),
            "nonfinite_steps_skipped": self.nonfinite_total,
            **({"data_skipped": skipped} if (skipped := self._skipped_everywhere()) is not None else {}),
            "best_" + self.task.spec.metric: None if self.best is None else self.best["value"],
            "best_step": None if self.best is None else self.best["step"],
            "output_dir": str(self.output_dir),
        }
        if is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            logger.info(format_summary(summary))
        result = TrainResult(
            stop_reason=stop_reason,
            step=self.step,
            best_step=summary["best_step"],
            best_value=None if self.best is None else self.best["value"],
            last_checkpoint=last_path,
            signal_number=self._stop_signal,
            summary=summary,
        )
        D.barrier()
        return result

    def _export_final(self) -> None:
        """Copy the newest weights (EMA when enabled) to ``final/`` as a from_pretrained folder."""
        newest = ckpt.list_checkpoints(self.checkpoint_root)[0]
        final = self.output_dir / "final"
        if ckpt.is_sharded(newest):
            ckpt.consolidate(newest, final, ema=self.ema is not None)
            return
        final.mkdir(exist_ok=True)
        source = ckpt.EMA_FILE if (newest / ckpt.EMA_FILE).is_file() else ckpt.MODEL_FILE
        for name, target in ((source, ckpt.MODEL_FILE), ("config.json", "config.json")):
            if (newest / name).is_file():
                atomic_write(final / target, lambda tmp, name=name: shutil.copyfile(newest / name, tmp))
