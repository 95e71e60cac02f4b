"""Typed run configuration: YAML recipe -> dataclasses -> ``section.key=value`` overrides.

A recipe is plain YAML with one mapping per section (``task``, ``model``, ``data``, ``optim``,
``schedule``, ``train``, ``parallel``). Every key is checked against the dataclass fields below, so a
typo (``optim.lrr``) is an error that names the key instead of a silently ignored setting, which is
how the official 79-flag script loses settings. Only ``task.options`` is free-form: it belongs to the
task, which validates it when it is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class TaskSection:
    """Which task trains, and its own settings (validated by the task, not here)."""

    name: str = ""
    """Registered task name (``vqav2``, ``classification``, ...: a name or alias of the task catalogue) or ``package.module:factory``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific settings: loss options, augmentation, text length, number of classes."""


@dataclass
class ModelSection:
    """What the task builds; the task decides how these map onto its model class."""

    preset: str = "base"
    """Model size preset: ``tiny``, ``base``, ``large`` or ``giant``."""
    pretrained: str | None = None
    """Checkpoint (file or folder) to initialise from; ``None`` trains from scratch."""
    image_size: int = 224
    """Input resolution; position tables are interpolated when it differs from the checkpoint."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the last block (linearly increasing over depth)."""
    config: dict[str, Any] = field(default_factory=dict)
    """``Beit3Config`` fields over the preset when training from scratch (e.g. ``{patch_size: 16}``).
    Ignored with ``pretrained``: the checkpoint's shape is the model's."""


@dataclass
class DataSection:
    """Batching. Sizes are global so a recipe means the same thing on 1 or 64 processes."""

    root: str | None = None
    """Dataset root folder passed to the task."""
    batch_size: int = 8
    """Samples per optimiser step over all processes (the official "effective batch")."""
    micro_batch_size: int | None = None
    """Samples per forward on one process; ``None`` uses batch_size / world_size. Gradient
    accumulation steps are derived as batch_size / (micro_batch_size * world_size)."""
    eval_batch_size: int | None = None
    """Per-process evaluation batch; ``None`` uses the micro-batch size."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    image_cache_mb: float = 1024
    """Memory for decoded images per process (index tasks), so a small dataset is decoded once rather
    than every epoch; it pays with ``num_workers: 0`` (workers start anew each epoch). 0 turns it off."""
    image_max_side: int | None = None
    """Shrink images whose longer side is larger than this as they are read (aspect kept), e.g. for
    folders of multi-megapixel photos and a 224 px model; ``None`` keeps them as they are."""
    text_padding: str = "longest"
    """Index tasks: ``longest`` cuts each batch's text to its longest text, rounded up to a multiple
    of 8 (no compute on padding the mask hides anyway; at most ``max_text_len / 8`` shapes for
    ``torch.compile``); ``max_length`` keeps every batch at the task's ``max_text_len`` (one shape)."""
    train_fraction: float = 1.0
    """Train on this fraction of the training samples (a data-efficiency regime: where pretraining
    shows most): the first ``ceil(fraction x n)`` of a permutation seeded by 0, so every run (any
    ``train.seed``, either start) sees the same ones; epochs are epochs of that subset. Map-style
    training sets only."""
    strict: bool = False
    """Raise on a bad training sample (naming its shard and key) instead of skipping and counting it
    (tasks that stream data, e.g. pretraining)."""


@dataclass
class OptimSection:
    """AdamW with per-group weight decay, layer-wise LR decay and a task-head LR multiplier."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-6
    """Floor the cosine decays to."""
    warmup_lr: float = 0.0
    """Learning rate at step 0; warmup is linear from here to ``lr`` (the official script
    accepts ``--warmup_lr`` but never uses it, always starting from 0)."""
    weight_decay: float = 0.05
    """Decoupled weight decay for matrices; biases, 1-D tensors and ``no_weight_decay()`` get 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0
    """LR scale ``layer_decay ** (num_layers + 1 - layer_id)``; 1.0 turns it off."""
    head_lr_scale: float = 1.0
    """Extra LR multiplier for top-level parameters whose name starts with ``head``
    (official ``--task_head_lr_weight``; the pooler keeps 1)."""
    clip_grad: float | None = None
    """Max global gradient norm; ``None`` disables clipping."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay; evaluation and the
    exported model then use the averaged weights."""


@dataclass
class ScheduleSection:
    """Linear warmup then cosine to ``optim.min_lr``, counted in optimiser steps."""

    epochs: int = 1
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    """Overrides ``warmup_epochs`` when set."""
    max_steps: int | None = None
    """Overrides ``epochs`` when set (useful for smoke tests and benchmarks)."""


@dataclass
class TrainSection:
    """Run bookkeeping: output, precision, logging, evaluation and checkpoint cadence."""

    output_dir: str = "runs/default"
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; ``fp16`` adds a dynamic loss scaler (as DeepSpeed fp16 did officially)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (CPU runs are deterministic regardless)."""
    log_every: int = 10
    """Optimiser steps between ``metrics.jsonl`` / TensorBoard train records."""
    eval_every: int | None = None
    """Steps between evaluations; ``None`` evaluates at the end of every epoch."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; ``None`` checkpoints at the end of every epoch."""
    keep_last: int = 2
    """Number of periodic checkpoints kept besides the best one."""
    checkpoint_format: Literal["full", "sharded"] = "full"
    """``full``: the main process gathers the whole model and writes ``model.safetensors`` (a
    ``from_pretrained`` folder); ``sharded``: every process writes its own shards with
    ``torch.distributed.checkpoint`` (no gather, no full copy in one process's memory; resumable on
    another number of processes; ``beit3 convert`` makes it a ``from_pretrained`` folder)."""
    async_checkpoint: bool = False
    """With ``checkpoint_format: sharded``: copy the state to CPU memory and write it in the background
    while training goes on (``torch.distributed.checkpoint.async_save``; one host copy of each
    process's shards, one save in flight at a time). The folder appears when complete, as ever."""
    max_nonfinite_steps: int = 5
    """Stop (after writing a checkpoint) when this many consecutive steps had a non-finite loss."""
    resume: str | None = None
    """``auto`` continues from the newest intact checkpoint in ``output_dir`` (starting fresh when
    there is none), a path resumes from that checkpoint, ``None`` starts fresh."""
    overwrite: bool = False
    """A fresh run (``resume`` unset) into an ``output_dir`` holding another run's checkpoints, ``final/``
    or ``summary.json`` is refused unless this is true; then that run's files (``checkpoints/``,
    ``final/``, ``metrics.jsonl``, ``summary.json``, ``run.yaml``, ``tensorboard/``) are deleted first.
    Other files in the folder are left alone."""
    progress_bar: bool = True
    """A tqdm bar when stderr is a terminal; otherwise (a log file) a plain line every 30 s."""
    threads: int | None = None
    """CPU threads of each process (``torch.set_num_threads``); ``None``: ``OMP_NUM_THREADS`` when set,
    else the cores this process may run on divided by the processes of this node (see
    docs/training.md: PyTorch's default oversubscribes a shared machine)."""
    compile: bool = False
    """``torch.compile`` each transformer block (the units of ``parallel.block_lists``) before the
    model is wrapped for DDP / FSDP2, after activation checkpointing (docs/training.md, "Compiling").
    The first steps pay the compilation (tens of seconds per block kind on CPU); the losses equal
    an uncompiled run's up to float rounding."""


@dataclass
class ParallelSection:
    """How the single-device model is spread over processes (applied from outside the model)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp`` replicates the model; ``fsdp`` shards parameters, gradients and optimizer state
    with FSDP2 ``fully_shard`` per block, then the root (needed for large/giant on small GPUs)."""
    block_lists: list[str] | None = None
    """Dotted paths of ``nn.ModuleList``s whose items are the sharding / checkpointing units;
    ``None`` uses every ModuleList attribute named ``layers``."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
    find_unused_parameters: bool = False
    """DDP: allow parameters that get no gradient (e.g. the text experts when fine-tuning on
    images only); costs an extra graph traversal per step, so it is off unless a task needs it."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3) instead of keeping them (ZeRO-2)."""
    meta_init: bool = False
    """FSDP: only the main process builds (initialises or loads) the whole model; the others build it
    on the ``meta`` device and receive their shards of the main process's values after sharding, so
    their peak memory is one shard, not the whole model. The weights are exactly those of the eager
    build."""
    timeout_minutes: int = 30
    """Collective timeout before a hung process group aborts."""


@dataclass
class RunConfig:
    """Everything one training run needs; saved as ``run.yaml`` next to its checkpoints."""

    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) that YAML and JSON can write."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Cross-field checks that do not depend on the world size (those live in the loop)."""
        problems = []
        if not self.task.name:
            problems.append("task.name is empty")
        if self.data.batch_size <= 0:
            problems.append("data.batch_size must be positive")
        if self.data.micro_batch_size is not None and self.data.micro_batch_size <= 0:
            problems.append("data.micro_batch_size must be positive")
        if not 0 < self.data.train_fraction <= 1:
            problems.append(f"data.train_fraction must be in (0, 1], not {self.data.train_fraction}")
        if self.data.image_cache_mb < 0:
            problems.append("data.image_cache_mb must be >= 0 (0 turns the decoded-image cache off)")
        if self.data.image_max_side is not None and self.data.image_max_side < 1:
            problems.append("data.image_max_side must be a positive number of pixels (or null)")
        if self.data.text_padding not in ("longest", "max_length"):
            problems.append(f"data.text_padding must be longest or max_length, not {self.data.text_padding!r}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.warmup_lr < 0:
            problems.append("optim.lr must be positive and optim.min_lr / optim.warmup_lr non-negative")
        if not 0 < self.optim.layer_decay <= 1:
            problems.append("optim.layer_decay must be in (0, 1]")
        if self.optim.ema_decay is not None and not 0 < self.optim.ema_decay < 1:
            problems.append("optim.ema_decay must be in (0, 1)")
        if self.schedule.epochs <= 0 and self.schedule.max_steps is None:
            problems.append("schedule.epochs must be positive (or set schedule.max_steps)")
        if self.train.keep_last < 1:
            problems.append("train.keep_last must be at least 1")
        if self.train.threads is not None and self.train.threads < 1:
            problems.append("train.threads must be at least 1 (or null)")
        if self.train.async_checkpoint and self.train.checkpoint_format != "sharded":
            problems.append("train.async_checkpoint needs train.checkpoint_format=sharded (full checkpoints are "
                            "gathered to one process and written there)")
        if self.train.max_nonfinite_steps < 1:
            problems.append("train.max_nonfinite_steps must be at least 1")
        if self.parallel.strategy == "fsdp" and self.train.precision == "fp16":
            problems.append("fp16 with FSDP is not supported (its loss scaler is not shard-aware); "
                            "use train.precision=bf16")
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))


PATH_OPTIONS = ("tokenizer", "answer2label", "label_file", "labels_file", "class_names", "visual_tokenizer")
"""``task.options`` keys that may hold a path (made absolute by :func:`resolve_paths` when relative
to the working folder, not to ``data.root``)."""


def resolve_paths(cfg: RunConfig, cwd: str | Path | None = None) -> RunConfig:
    """Make the path-valued settings absolute, in place, so ``run.yaml`` means the same from any folder.

    ``data.root``, ``model.pretrained``, ``train.output_dir`` and a ``train.resume`` path are taken
    relative to ``cwd`` (the working folder). A ``task.options`` path (:data:`PATH_OPTIONS`) is made
    absolute only when it names something under ``cwd`` and nothing under ``data.root``: tasks read
    some relative paths under ``data.root`` (index files, the pretraining tokenizers), which an
    absolute ``data.root`` keeps meaning the same. Returns ``cfg``.
    """
    import os

    base = Path(cwd) if cwd is not None else Path.cwd()

    def absolute(value: str) -> str:
        path = Path(os.path.expanduser(value))
        return value if path.is_absolute() else os.path.normpath(base / path)

    if cfg.data.root:
        cfg.data.root = absolute(cfg.data.root)
    if cfg.model.pretrained:
        cfg.model.pretrained = absolute(cfg.model.pretrained)
    if cfg.train.output_dir:
        cfg.train.output_dir = absolute(cfg.train.output_dir)
    if cfg.train.resume and cfg.train.resume != "auto":
        cfg.train.resume = absolute(cfg.train.resume)
    for key in PATH_OPTIONS:
        value = cfg.task.options.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        under_root = cfg.data.root is not None and (Path(cfg.data.root) / value).exists()
        if (base / value).exists() and not under_root:
            cfg.task.options[key] = absolute(value)
    return cfg


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, choices: list[str]) -> KeyError:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return KeyError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(sorted(choices))}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field type, converting only where YAML is lossy.

    PyYAML reads ``3e-5`` as a string (YAML 1.1 wants ``3.0e-5``), and CLI overrides arrive as
    text, so numeric strings are accepted for float fields; anything else of the wrong type is an
    error naming the key.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {hint!r}")


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a validated config; unknown sections or keys raise ``KeyError`` naming them."""
    if not isinstance(raw, dict):
        raise ValueError("a recipe must be a mapping of sections")
    sections = _field_types(RunConfig)
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise _unknown(name, list(sections))
        cls = sections[name]
        types_ = _field_types(cls)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"section '{name}' must be a mapping, got {values!r}")
        kwargs = {}
        for key, value in values.items():
            if key not in types_:
                raise _unknown(f"{name}.{key}", [f"{name}.{k}" for k in types_])
            kwargs[key] = _coerce(value, types_[key], f"{name}.{key}")
        built[name] = cls(**kwargs)
    cfg = RunConfig(**built)
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is read as YAML (``1e-4`` -> float, ``null`` -> None)."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form section.key=value")
    dotted, _, literal = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ValueError(f"override '{text}' must name a section and a key, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(literal) if literal.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override '{text}': the value is not valid YAML ({_yaml_problem(err)}); quote it, "
                         "e.g. key='\"a: b\"'") from None
    return path, value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (line and column counted from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the recipe dict with each ``a.b.c=value`` applied in order.

    ``task.options.<name>`` may create new keys (the task validates them); every other path must
    already be a config field, which :func:`config_from_dict` checks afterwards.
    """
    merged = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return merged


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or start from defaults when ``None``) and apply overrides."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"recipe {path} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"recipe {path} must be a mapping of sections (model:, task:, ...), "
                             f"not a {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, list(overrides)))
