"""Image-text contrastive intermediate tuning (task ``itc``): how the released ``-itc`` checkpoints were made.

After masked data modeling, BEiT-3 tunes the dual encoder (the retrieval heads) on the
pretraining pairs with a contrastive loss (paper section 3.2: 5 epochs, batch 16k, lr 3e-5), and
starts retrieval fine-tuning from that. ``beit3 pretrain --objective itc model.pretrained=<mdm export>``
runs it on the engine: the model is ``Beit3ForImageTextRetrieval`` and the loss is the retrieval
task's symmetric InfoNCE over the features of every process, with gradients only through the
local slice, so memory grows linearly with the global batch. The result loads into the retrieval
task with ``model.pretrained`` like any checkpoint.

Options: ``tokenizer`` (else the one saved with ``model.pretrained``), ``pairs`` (tar shards under
``data.root``, default ``pretrain/pairs/*.tar``), ``val_size`` (held-out pairs, default 64),
``text_length`` (default 64), ``crop_scale`` (default [0.5, 1.0]), ``horizontal_flip`` (default true;
false for captions that say "left" and "right").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from beit3.catalogue import TaskSpec, register_task
from beit3.pretraining.data import collect_refs

_KNOWN = {"tokenizer", "pairs", "val_size", "text_length", "crop_scale", "horizontal_flip"}


class PairDataset(Dataset):
    """Image-text pairs from tar shards -> ``pixel_values``, ``input_ids``, ``attention_mask``, ``index``."""

    def __init__(self, source: Any, refs: list[Any], tokenizer: Any, image_transform: Callable[[Any], torch.Tensor],
                 text_length: int):
        self.source, self.refs, self.tokenizer = source, refs, tokenizer
        self.image_transform, self.text_length = image_transform, text_length

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.source.load(self.refs[index])
        text = self.tokenizer([sample["text"]], max_length=self.text_length, padding="max_length", truncation=True, return_tensors="pt")
        return {"pixel_values": self.image_transform(sample["image"]),
                "input_ids": text["input_ids"][0], "attention_mask": text["attention_mask"][0],
                "index": torch.tensor(index)}


@register_task
class ContrastiveTuningTask:
    spec = TaskSpec(
        name="itc", kind="pretrain", description="image-text contrastive intermediate tuning of the dual encoder "
        "(the release's -itc models)", metric="average_score",
        statistics={"image_embeds": "gather", "text_embeds": "gather", "index": "gather"},
    )

    collate_fn = staticmethod(default_collate)

    def __init__(self, cfg: Any) -> None:
        from beit3.tasks.common import load_tokenizer

        options = dict(cfg.task.options)
        unknown = sorted(set(options) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown itc option(s) {unknown}; known: {sorted(_KNOWN)}")
        self.options = options
        self.tokenizer = load_tokenizer(options, cfg)
        self.root = Path(cfg.data.root) if cfg.data.root else None

    def build_model(self, cfg: Any) -> nn.Module:
        from beit3.models import Beit3ForImageTextRetrieval
        from beit3.tasks.common import build_task_model

        return build_task_model(Beit3ForImageTextRetrieval, cfg, self.tokenizer)

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        from beit3.data import TarShards
        from beit3.data.transforms import train_image_transform
        from beit3.processing import Beit3ImageProcessor

        pattern = self.options.get("pairs", "pretrain/pairs/*.tar")
        if self.root is not None and not Path(pattern).is_absolute():
            pattern = str(self.root / pattern)
        source = TarShards(pattern)
        refs = collect_refs(source)
        val_size = int(self.options.get("val_size", 64))
        if len(refs) <= val_size:
            raise ValueError(f"itc pairs: {len(refs)} samples, not more than val_size={val_size}")
        length = int(self.options.get("text_length", 64))
        scale = tuple(self.options.get("crop_scale", (0.5, 1.0)))
        train_images = train_image_transform(cfg.model.image_size, mode="vl", randaug=False, crop_scale=scale,
                                             horizontal_flip=bool(self.options.get("horizontal_flip", True)))
        eval_images = Beit3ImageProcessor(cfg.model.image_size, "vl").preprocess
        train = PairDataset(source, refs[: len(refs) - val_size], self.tokenizer, train_images, length)
        val = PairDataset(source, refs[len(refs) - val_size:], self.tokenizer, eval_images, length) if val_size else None
        return train, val

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        from beit3.training.contrastive import distributed_contrastive_loss

        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], return_loss=False)
        scale = out.logit_scale  # exp(logit_scale), with its gradient
        loss = distributed_contrastive_loss(out.image_embeds, out.text_embeds, scale)
        return loss, {"logit_scale": scale.detach()}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        keep = ~batch["is_padding"].bool()
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], return_loss=False)
        return {"image_embeds": [out.image_embeds[keep].float().cpu()], "text_embeds": [out.text_embeds[keep].float().cpu()],
                "index": [batch["index"][keep].cpu()]}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        """Recall@1/5/10 both ways over the held-out pairs (each image has one caption)."""
        from beit3.tasks.metrics import retrieval_recall

        image_embeds, text_embeds, index = (torch.cat(stats[key]) for key in ("image_embeds", "text_embeds", "index"))
        return retrieval_recall(image_embeds, index, text_embeds, index)
