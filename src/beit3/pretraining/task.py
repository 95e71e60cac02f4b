"""``beit3 pretrain``: masked data modeling on the training engine (task name ``mdm``).

Recipe options (``task.options``), all optional except ``visual_tokenizer``:

Relative paths are taken under ``data.root``.

* ``visual_tokenizer``: a VQ-KD directory (``beit3 visual-tokenizer train``) or a released BEiT v2
  tokenizer ``.pth``; its patch grid must equal the model's.
* ``tokenizer``: a text tokenizer directory or ``.spm`` file. Without one a unigram tokenizer of
  ``text_vocab_size`` pieces is trained on the text corpus. Either way it is saved in
  ``<output_dir>/text_tokenizer``; :func:`export_pretrained` puts it next to the weights.
* ``vocab_size``: rows of the text embedding and MLM head of a model built from scratch (default:
  the tokenizer's size; the release pads the official 64002 ids to 64010).
* ``images`` / ``pairs``: tar shards (globs, relative to ``data.root``); ``texts``: text files.
  Defaults: the synthetic world's ``pretrain/images/*.tar``, ``pretrain/pairs/*.tar``,
  ``pretrain/texts.txt``.
* ``val_size``: samples of each source held out for validation (default 32).
* ``streaming``: ``auto`` (default: when ``images`` or ``pairs`` name a ``.tar.gz`` shard or an
  ``http(s)://`` / ``pipe:`` URL), ``true`` or ``false``. Streamed sources are read by
  :class:`~beit3.pretraining.data.MaskedDataModelingStream` (``shuffle_buffer``, default 1000);
  the run then needs ``schedule.max_steps``.
* bad samples are skipped and counted per source and shard (``skipped_<source>`` in metrics.jsonl,
  ``data_skipped`` in summary.json); ``data.strict=true`` raises instead, naming shard and key.
* masking: ``text_mask_prob`` (0.15), ``pair_mask_prob`` (0.5), ``image_mask_ratio`` (0.4),
  ``min_block_patches`` (16), ``pair_mask_image`` (true), ``text_length`` (64), ``caption_length`` (32).
* augmentation: ``crop_scale`` ([0.2, 1.0]), ``color_jitter`` (0.4), ``horizontal_flip`` (true; the
  synthetic recipe turns it off because its captions say "left of").
* ``loss_weights``: per stream, default 1 each (``text_mlm``, ``pair_mlm``, ``image_mim``, ``pair_mim``).
* ``visual_vocab_size`` is read off the tokenizer.
* ``stages``: stage-wise pretraining (VLMo's recipe), a list of stages run one after another, each
  ``{name, steps, sources, freeze}``: ``sources`` the data it trains on (of ``images``, ``texts``,
  ``pairs``; default all three), ``freeze`` the parameter groups it keeps as they are (of
  ``vision``, ``language``, ``vl``, ``shared``; see :func:`parameter_group`). ``schedule.max_steps``
  must be the sum of the steps. See :class:`Stage` and docs/pretraining.md.

Validation reports each stream's loss and accuracy, its targets' unigram entropy
(``<stream>_unigram_entropy``: the loss of a model that only knows the targets' frequencies; a
loss below it means the context is used), and ``pair_mlm_loss_shuffled``: the pair-MLM loss when
every caption is shown another sample's image. The gap to ``pair_mlm_loss`` measures how much
the text predictions use the image.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from beit3.catalogue import TaskSpec, register_task
from beit3.pretraining.data import (
    SKIPS_KEY,
    SOURCE_FIELDS,
    MaskedDataModelingDataset,
    MaskedDataModelingStream,
    MaskedSamples,
    MaskingOptions,
    pretraining_collate,
    source_refs,
    split_refs,
)
from beit3.pretraining.vqkd import VQKD

logger = logging.getLogger(__name__)

STREAMS = ("text_mlm", "pair_mlm", "image_mim", "pair_mim")
EVAL_STREAMS = (*STREAMS, "pair_mlm_shuffled")
_MASKING_KEYS = {f.name for f in dataclasses.fields(MaskingOptions)}
_KNOWN = _MASKING_KEYS | {"visual_tokenizer", "tokenizer", "text_vocab_size", "vocab_size", "images", "pairs", "texts",
                          "val_size", "crop_scale", "color_jitter", "horizontal_flip", "loss_weights",
                          "streaming", "shuffle_buffer", "stages"}
STREAM_SOURCE = {"text_mlm": "texts", "pair_mlm": "pairs", "image_mim": "images", "pair_mim": "pairs"}
_BATCH_PREFIX = {"images": "image_", "texts": "text_", "pairs": "pair_"}
PARAMETER_GROUPS = ("vision", "language", "vl", "shared")


def parameter_group(name: str) -> str:
    """The group of a pretraining model's parameter, for ``freeze``: ``vision`` (what only images use:
    the vision experts and norms, the decoupled layout's vision attention, the patch embedding and
    the MIM head), ``language`` (the same for text: language experts, text attention when
    decoupled, the text embedding, the MLM head), ``vl`` (the vision-language experts of the top
    layers) or ``shared`` (the rest: the shared layout's self-attention)."""
    parts = name.split(".")
    if "vl" in parts:
        return "vl"
    if "vision" in parts or parts[-1] == "vision_pos_embed" or "vision_embed" in parts or parts[0] == "mim_head":
        return "vision"
    if "text" in parts or parts[-1] in ("text_embed", "text_pos_embed") or "text_embed" in parts or parts[0] == "mlm_head":
        return "language"
    return "shared"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of stage-wise pretraining: ``steps`` optimiser steps on ``sources``, with the
    parameter groups in ``freeze`` left as they are (no gradient, no update, no weight decay)."""

    name: str
    steps: int
    sources: tuple[str, ...] = ("images", "texts", "pairs")
    freeze: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, index: int, raw: Any) -> "Stage":
        where = f"task.options.stages[{index}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be a mapping with steps, sources and freeze, not {raw!r}")
        unknown = sorted(set(raw) - {"name", "steps", "sources", "freeze"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: name, steps, sources, freeze")
        steps = raw.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"{where}.steps must be a positive number of steps, not {steps!r}")
        sources = tuple(raw.get("sources") or SOURCE_FIELDS)
        bad = sorted(set(sources) - set(SOURCE_FIELDS))
        if bad or len(set(sources)) != len(sources):
            raise ValueError(f"{where}.sources: {sources}; each of {list(SOURCE_FIELDS)} at most once")
        freeze = frozenset(raw.get("freeze") or ())
        bad = sorted(freeze - set(PARAMETER_GROUPS))
        if bad:
            raise ValueError(f"{where}.freeze: unknown group(s) {bad}; groups are {list(PARAMETER_GROUPS)}")
        return cls(name=str(raw.get("name") or f"stage{index + 1}"), steps=steps, sources=sources, freeze=freeze)

    def frozen(self, name: str) -> bool:
        return parameter_group(name) in self.freeze


@register_task
class MaskedDataModelingTask:
    """The TrainTask of BEiT-3 pretraining."""

    spec = TaskSpec(
        name="mdm", kind="pretrain", description="BEiT-3 masked data modeling on images, "
        "texts and pairs", metric="loss", higher_is_better=False,
        statistics={"streams": "sum", **{f"{key}_histogram": "sum" for key in ("text_mlm", "pair_mlm", "image_mim",
                                                                              "pair_mim")}},
    )

    collate_fn = staticmethod(pretraining_collate)  # fixed-shape rows for every stream, plus the skipped samples

    def __init__(self, cfg: Any) -> None:
        options = dict(cfg.task.options)
        unknown = sorted(set(options) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown pretraining option(s) {unknown}; known: {sorted(_KNOWN)}")
        if not options.get("visual_tokenizer"):
            raise ValueError("task.options.visual_tokenizer is required: a VQ-KD directory "
                             "('beit3 visual-tokenizer train') or a BEiT v2 tokenizer .pth")
        self.options = options
        self.masking = MaskingOptions(**{k: v for k, v in options.items() if k in _MASKING_KEYS})
        weights = {name: 1.0 for name in STREAMS}
        for name, value in dict(options.get("loss_weights") or {}).items():
            if name not in weights:
                raise ValueError(f"loss_weights: unknown stream {name!r}; streams are {list(STREAMS)}")
            weights[name] = float(value)
        self.loss_weights = weights
        self.stages = tuple(Stage.parse(i, raw) for i, raw in enumerate(options.get("stages") or ()))
        if self.stages:
            total = sum(stage.steps for stage in self.stages)
            if cfg.schedule.max_steps != total:
                raise ValueError(f"task.options.stages take {total} steps in all: set schedule.max_steps={total} "
                                 f"(it is {cfg.schedule.max_steps})")
        self.root = Path(cfg.data.root) if cfg.data.root else None
        self.cfg = cfg
        self._tokenizers: tuple[Any, VQKD] | None = None
        self._skipped: dict[str, dict[str, int]] = {name: {} for name in SOURCE_FIELDS}
        self._stream: MaskedDataModelingStream | None = None  # the training data, when streamed

    def setup(self, cfg: Any, dist: Any = None) -> None:
        """Load the visual tokenizer and get the text tokenizer: trained on the corpus when none is
        given. The engine runs this on the main process first, then on the others, which load the
        tokenizer the main one saved instead of training it again."""
        if (dist is not None and dist.world_size > 1 and cfg.parallel.strategy == "ddp"
                and not cfg.parallel.find_unused_parameters
                and any(len(stage.sources) < len(SOURCE_FIELDS) for stage in self.stages)):
            raise ValueError("a stage that trains on some sources leaves the others' parameters without a "
                             "gradient, which DDP waits for: set parallel.find_unused_parameters=true "
                             "(or use parallel.strategy=fsdp)")
        visual = VQKD.from_pretrained(self._path(self.options["visual_tokenizer"])).freeze()
        main = dist is None or dist.is_main
        self._tokenizers = (self._text_tokenizer(cfg, main), visual)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizers is None:
            self.setup(self.cfg)
        return self._tokenizers[0]

    @property
    def visual_tokenizer(self) -> VQKD:
        if self._tokenizers is None:
            self.setup(self.cfg)
        return self._tokenizers[1]

    # ------------------------------------------------------------------------------ building
    def _path(self, value: Any) -> Any:
        """A path option under ``data.root`` (each of a list); absolute paths and URLs as they are."""
        from beit3.data.streams import STREAM_PREFIXES

        if isinstance(value, (list, tuple)):
            return [self._path(item) for item in value]
        value = str(value)
        if self.root is None or Path(value).is_absolute() or value.startswith(STREAM_PREFIXES):
            return value
        return str(self.root / value)

    def _text_tokenizer(self, cfg: Any, main: bool):
        from beit3.processing import Beit3Tokenizer, train_tokenizer

        given = self.options.get("tokenizer")
        saved = Path(cfg.train.output_dir) / "text_tokenizer"
        if not main:  # the main process has put it there
            return Beit3Tokenizer.from_pretrained(saved)
        if given:
            path = Path(self._path(given))
            tokenizer = Beit3Tokenizer.from_pretrained(path) if path.is_dir() else Beit3Tokenizer(path)
        else:
            texts = sorted(Path(p) for p in _glob(self._path(self.options.get("texts", "pretrain/texts.txt"))))
            if not texts:
                raise FileNotFoundError("no text files for the tokenizer; set task.options.tokenizer or texts")
            tokenizer = train_tokenizer(texts, int(self.options.get("text_vocab_size", 256)), progress=False,
                                        num_threads=1)
        tokenizer.save_pretrained(saved)  # kept with the run: export_pretrained() ships it next to the weights
        return tokenizer

    def build_model(self, cfg: Any) -> nn.Module:
        from beit3.models import Beit3ForPreTraining

        overrides = dict(image_size=cfg.model.image_size, drop_path_rate=cfg.model.drop_path_rate)
        if cfg.model.pretrained:
            model = Beit3ForPreTraining.from_pretrained(cfg.model.pretrained, **overrides)
        else:
            from beit3.config import Beit3Config

            vocab = int(self.options.get("vocab_size") or self.tokenizer.vocab_size)
            config = Beit3Config.from_preset(cfg.model.preset, **{**cfg.model.config, "vocab_size": vocab, **overrides})
            model = Beit3ForPreTraining(config, visual_vocab_size=self.visual_tokenizer.config.codebook_size)
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the model has {model.config.vocab_size} text ids, fewer than the tokenizer's "
                             f"{self.tokenizer.vocab_size}")
        grid = self.visual_tokenizer.config.grid_size
        if model.config.grid_size != grid:
            raise ValueError(f"the visual tokenizer gives a {grid}x{grid} code grid but the model has "
                             f"{model.config.grid_size}x{model.config.grid_size} patches; see docs/pretraining.md")
        return model

    def build_datasets(self, cfg: Any) -> tuple[Any, MaskedDataModelingDataset | None]:
        from beit3.data import TarShards, TextFiles
        from beit3.data.streams import is_streamed

        opts = self.options
        sources = {
            "images": TarShards(self._path(opts.get("images", "pretrain/images/*.tar"))),
            "texts": TextFiles(self._path(opts.get("texts", "pretrain/texts.txt"))),
            "pairs": TarShards(self._path(opts.get("pairs", "pretrain/pairs/*.tar"))),
        }
        streaming = opts.get("streaming", "auto")
        if streaming not in ("auto", True, False):
            raise ValueError(f"task.options.streaming must be auto, true or false, not {streaming!r}")
        if streaming == "auto":
            streaming = any(is_streamed(shard) for name in ("images", "pairs") for shard in sources[name].shards)
        val_size = int(opts.get("val_size", 32))
        common = dict(image_size=cfg.model.image_size,
                      patch_size=cfg.model.image_size // self.visual_tokenizer.config.grid_size,
                      options=self.masking, crop_scale=tuple(opts.get("crop_scale", (0.2, 1.0))),
                      color_jitter=float(opts.get("color_jitter", 0.4)),
                      horizontal_flip=bool(opts.get("horizontal_flip", True)))
        train_samples = MaskedSamples(self.tokenizer, train=True, **common)
        val_samples = MaskedSamples(self.tokenizer, train=False, **common)
        strict = bool(getattr(cfg.data, "strict", False))
        if streaming:
            return self._streamed_datasets(cfg, sources, train_samples, val_samples, val_size, strict)
        train, val = {}, {}
        for name, source in sources.items():
            refs = source_refs(source)  # tar shards: counts from the shard index, headers read lazily
            if len(refs) <= val_size:
                raise ValueError(f"pretraining {name}: {len(refs)} samples, not more than val_size={val_size}")
            train[name], val[name] = ((source, part) for part in split_refs(refs, val_size))
        train_set = MaskedDataModelingDataset(train["images"], train["texts"], train["pairs"], train_samples,
                                              seed=cfg.train.seed, strict=strict)
        val_set = MaskedDataModelingDataset(val["images"], val["texts"], val["pairs"], val_samples,
                                            seed=cfg.train.seed, strict=strict) if val_size else None
        return train_set, val_set

    def _streamed_datasets(self, cfg: Any, sources: dict[str, Any], train_samples: MaskedSamples,
                           val_samples: MaskedSamples, val_size: int, strict: bool) -> tuple[Any, Any]:
        """Streams for training; validation holds the first ``val_size`` samples of each source (in
        shard order, read once at start and kept in memory), which training leaves out."""
        from beit3.data.streams import head_refs

        holdout, val = {}, {}
        for name, source in sources.items():
            refs, holdout[name] = head_refs(source, val_size)
            if len(refs) < val_size:
                raise ValueError(f"pretraining {name}: {len(refs)} samples, fewer than val_size={val_size}")
            val[name] = (source, refs)
        train_set = MaskedDataModelingStream(sources, train_samples, seed=cfg.train.seed, strict=strict,
                                             shuffle_buffer=int(self.options.get("shuffle_buffer", 1000)),
                                             holdout=holdout)
        self._stream = train_set
        val_set = MaskedDataModelingDataset(val["images"], val["texts"], val["pairs"], val_samples,
                                            seed=cfg.train.seed, strict=strict) if val_size else None
        return train_set, val_set

    # ------------------------------------------------------------------------------ steps
    # ------------------------------------------------------------------------------ stages
    def stage_index(self, step: int) -> int | None:
        """The position in ``stages`` of the stage optimiser step ``step`` (0-based) belongs to."""
        if not self.stages:
            return None
        ends = itertools.accumulate(stage.steps for stage in self.stages)
        return next((i for i, end in enumerate(ends) if step < end), len(self.stages) - 1)

    def stage(self, step: int) -> Stage | None:
        """The stage optimiser step ``step`` belongs to; None without stages."""
        index = self.stage_index(step)
        return None if index is None else self.stages[index]

    def frozen(self, step: int) -> Any:
        """The engine's hook: a predicate over parameter names whose gradients it drops before
        optimiser step ``step`` (the stage's ``freeze``), or None when nothing is frozen."""
        stage = self.stage(step)
        return stage.frozen if stage is not None and stage.freeze else None

    def _stage_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch with the sources the stage does not train on left out (not run at all)."""
        stage = self.stage(step)
        if stage is None:
            return batch
        dropped = tuple(_BATCH_PREFIX[name] for name in SOURCE_FIELDS if name not in stage.sources)
        return {k: v for k, v in batch.items() if not k.startswith(dropped)} if dropped else batch

    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokenizer = self.visual_tokenizer
        inputs = {k: v for k, v in batch.items() if k not in ("is_padding", SKIPS_KEY)}
        device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
        if next(tokenizer.parameters()).device != device:
            tokenizer.to(device)
        with torch.no_grad():
            if "image_pixel_values" in batch:
                inputs["image_labels"] = tokenizer.get_codebook_indices(batch["image_pixel_values"].float())
            if "pair_image_mask" in batch:
                inputs["pair_image_labels"] = tokenizer.get_codebook_indices(batch["pair_pixel_values"].float())
        return inputs

    def _weighted_loss(self, out: Any) -> torch.Tensor:
        return sum(self.loss_weights[name] * result.loss for name, result in out.streams().items())

    # ------------------------------------------------------------------------------ data counts
    def skipped_samples(self) -> dict[str, dict[str, int]]:
        """Bad training samples this process skipped so far: source -> shard -> count (every source listed)."""
        from beit3.data.datasets import merge_skip_counts

        streamed = self._stream.skipped_samples() if self._stream is not None else {}
        return merge_skip_counts([{name: {} for name in SOURCE_FIELDS}, self._skipped, streamed])

    def load_skipped_samples(self, state: Mapping[str, Mapping[str, int]]) -> None:
        """Continue the counts of a checkpoint (:meth:`skipped_samples` of the run that wrote it)."""
        self._skipped = {name: {} for name in SOURCE_FIELDS}
        for name, shards in state.items():
            self._skipped.setdefault(name, {}).update({str(k): int(v) for k, v in shards.items()})

    def _count_skips(self, batch: dict[str, Any]) -> None:
        for name, shard in batch.pop(SKIPS_KEY, None) or ():
            counts = self._skipped.setdefault(name, {})
            counts[shard] = counts.get(shard, 0) + 1

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._count_skips(batch)  # counted as the batch is consumed, so prefetching never counts twice
        out = model(**self._inputs(self._stage_batch(batch, step)))
        logs = {}
        for name, result in out.streams().items():
            logs[f"{name}_loss"] = float(result.loss.detach())
            logs[f"{name}_acc"] = float(result.accuracy)
        if self.stages:
            logs["stage"] = float(self.stage_index(step) + 1)
        return self._weighted_loss(out), logs

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per stream: (loss x targets, correct, targets), and the histograms of the targets.

        Padding rows are left out before the forward; every process has as many batches, but a
        sharded model needs each process in every forward, so a batch is never skipped.
        """
        keep = ~batch["is_padding"].bool()
        batch = {k: v[keep] for k, v in batch.items() if k not in ("is_padding", SKIPS_KEY)}
        inputs = self._inputs(batch)
        streams = model(**inputs).streams()
        if batch["pair_pixel_values"].shape[0] > 1:  # every caption with another sample's image
            streams["pair_mlm_shuffled"] = model(
                pair_pixel_values=batch["pair_pixel_values"].roll(1, dims=0),
                pair_input_ids=inputs["pair_input_ids"], pair_attention_mask=inputs["pair_attention_mask"],
                pair_labels=inputs["pair_labels"]).pair_mlm
        device = batch["image_pixel_values"].device
        totals = torch.zeros(len(EVAL_STREAMS), 3, dtype=torch.float64, device=device)
        for row, key in enumerate(EVAL_STREAMS):
            result = streams.get(key)
            if result is not None:
                n = result.num_targets
                totals[row] = torch.stack([result.loss.double() * n, result.accuracy.double() * n,
                                           torch.tensor(float(n), dtype=torch.float64, device=device)])
        sizes = {"text_mlm": self.tokenizer.vocab_size, "pair_mlm": self.tokenizer.vocab_size,
                 "image_mim": self.visual_tokenizer.config.codebook_size,
                 "pair_mim": self.visual_tokenizer.config.codebook_size}
        targets = self._targets(inputs)
        out = {"streams": totals}
        for key, size in sizes.items():
            values = targets.get(key)
            out[f"{key}_histogram"] = torch.zeros(size, dtype=torch.float64, device=device) if values is None else \
                torch.bincount(values, minlength=size).double()
        return out

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key in STREAMS:
            # Entropy of the targets' own frequencies: the loss of a model that ignores the context.
            counts = stats[f"{key}_histogram"]
            if counts.sum() > 0:
                p = counts[counts > 0] / counts.sum()
                metrics[f"{key}_unigram_entropy"] = float(-(p * p.log()).sum())
        for key, (loss_sum, correct, n) in zip(EVAL_STREAMS, stats["streams"].tolist()):
            if n > 0:
                metrics[f"{key}_loss"] = loss_sum / n
                metrics[f"{key}_acc"] = correct / n
        if "pair_mlm_shuffled_loss" in metrics:
            metrics["pair_mlm_loss_shuffled"] = metrics.pop("pair_mlm_shuffled_loss")
            metrics.pop("pair_mlm_shuffled_acc")
        metrics["loss"] = sum(self.loss_weights[k] * metrics[f"{k}_loss"] for k in STREAMS if f"{k}_loss" in metrics)
        return metrics

    @staticmethod
    def _targets(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ids each stream must predict, flattened."""
        out = {"text_mlm": inputs["text_labels"][inputs["text_labels"] != -100],
               "pair_mlm": inputs["pair_labels"][inputs["pair_labels"] != -100],
               "image_mim": inputs["image_labels"][inputs["image_mask"]]}
        if "pair_image_mask" in inputs:
            out["pair_mim"] = inputs["pair_image_labels"][inputs["pair_image_mask"]]
        return out


def export_pretrained(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Turn a pretraining run into a ``from_pretrained`` folder for fine-tuning.

    Writes the weights with ``Beit3ForPreTraining.save_pretrained`` and copies the run's text
    tokenizer next to them, so a fine-tuning recipe only needs ``model.pretrained=<out_dir>`` (the
    tasks read the tokenizer from there).
    checkpoint: another folder of the run (e.g. ``checkpoints/step_00001000``) instead of ``final``.
    """
    from beit3.models import Beit3ForPreTraining

    import tempfile

    from beit3.training.checkpoint import consolidate, is_sharded

    run_dir = Path(run_dir)
    source = Path(checkpoint) if checkpoint is not None else run_dir / "final"
    with tempfile.TemporaryDirectory() as scratch:
        if is_sharded(source):  # train.checkpoint_format=sharded: gather the shards into one folder first
            source = consolidate(source, Path(scratch) / "weights")
        model = Beit3ForPreTraining.from_pretrained(source)
    out = model.save_pretrained(out_dir)
    tokenizer_dir = run_dir / "text_tokenizer"
    if tokenizer_dir.is_dir():
        from beit3.processing import Beit3Tokenizer

        Beit3Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _glob(pattern: str) -> list[str]:
    import glob

    return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else ([pattern] if Path(pattern).exists() else [])


from beit3.pretraining import itc  # noqa: E402,F401  (registers the itc task)
