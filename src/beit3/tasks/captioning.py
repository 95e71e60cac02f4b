"""Image captioning (COCO Karpathy split, NoCaps): task ``captioning``.

Training is the release's masked fine-tuning: a share ``mask_prob`` of each caption's tokens is
corrupted (``beit3.processing``), every text token sees the image and the tokens to its left, and
the masked slots are scored by KL divergence to a label-smoothed one-hot; from optimiser step
``drop_worst_after`` on, the worst ``drop_worst_ratio`` of the masked tokens of each micro-batch
are left out. Validation decodes with beam search and reports CIDEr-D (:func:`cider_d`, a
fraction as in the release: 1.434 is the "143.4" of the tables) on lower-cased, punctuation-free
words; ``beit3 evaluate`` adds BLEU, METEOR and ROUGE-L with the COCO toolkit when installed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beit3.catalogue import TaskSpec, register_task
from beit3.data import ImageTextDataset, read_jsonl
from beit3.data.transforms import DEFAULT_CAPTIONING_MASK_PROB, mask_caption_tokens
from beit3.models import Beit3ForCaptioning
from beit3.processing import Beit3Tokenizer
from beit3.tasks.common import IndexTask, SampleProcessor, build_task_model, image_transform, index_files, \
    index_rows, kept, load_tokenizer, unwrap
from beit3.tasks.metrics import cider_d, coco_caption_scores
from beit3.training.config import RunConfig

DEFAULTS: dict[str, Any] = {
    "dataset": "coco",
    "randaug": True,
    "max_text_len": 32,
    "mask_prob": DEFAULT_CAPTIONING_MASK_PROB,
    "drop_worst_after": 12000,
    "drop_worst_ratio": 0.2,
    "label_smoothing": 0.1,
    "num_beams": 3,
    "length_penalty": 0.6,
    "max_decode_len": None,
    "min_decode_len": 3,
}

_PUNCTUATION = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lower-case words without punctuation: close to the PTB tokenisation COCO evaluation uses,
    without Java."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class CaptionMasking:
    """The training corruption of an encoded caption (:func:`beit3.data.transforms.mask_caption_tokens`):
    ``input_ids`` masked, ``labels`` the original ids, ``masked_positions`` the slots to score."""

    def __init__(self, mask_prob: float, mask_token_id: int, vocab_size: int) -> None:
        self.mask_prob, self.mask_token_id, self.vocab_size = mask_prob, mask_token_id, vocab_size

    def __call__(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masked, positions = mask_caption_tokens(text["input_ids"], text["attention_mask"], self.mask_prob,
                                                self.mask_token_id, self.vocab_size)
        return {"input_ids": masked, "attention_mask": text["attention_mask"], "masked_positions": positions,
                "labels": text["input_ids"]}


def another_images_caption(spec: TaskSpec, index_root: Path) -> dict[str, Any]:
    """A blind captioner as a baseline: each eval image gets a reference caption of the next
    image, a fluent sentence of the right kind that does not describe it (CIDEr averaged over the
    reference slots)."""
    rows = index_rows(index_root, spec.index_file(spec.eval_split))
    refs = {r["image_id"]: [simple_tokenize(t) for t in r["references"]] for r in rows}
    ids = list(refs)
    slots = range(min(len(v) for v in refs.values()))
    scores = [cider_d({k: refs[ids[(i + 1) % len(ids)]][j] for i, k in enumerate(ids)}, refs)[0] for j in slots]
    return {"name": "another image's caption", "value": sum(scores) / len(scores)}


def evaluation_outputs(task: "CaptioningTask", stats: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """``beit3 evaluate``: the captions themselves, and the COCO toolkit's scores when asked."""
    captions = dict(stats["captions"])
    extra: dict[str, Any] = {"predictions": [{"image_id": k, "caption": v} for k, v in sorted(captions.items())]}
    if context.get("coco_toolkit") and context["is_main"]:
        # reported beside our own cider, never in its place
        scores = coco_caption_scores(captions, {k: task.references[k] for k in captions})
        extra["metrics"] = {f"coco_{name}": value for name, value in scores.items()}
    return extra


@register_task
class CaptioningTask(IndexTask):
    spec = TaskSpec(
        name="captioning", kind="finetune", aliases=("caption",),
        hub_pipeline_tag="image-to-text",
        description="captioning (COCO, NoCaps): masked fine-tuning, CIDEr",
        model_class=Beit3ForCaptioning, head_keys=("mlm_head.weight",), image_mode="vl", randaug=True,
        index="{prefix}.{split}.jsonl", datasets={"coco": "coco_captioning", "nocaps": "nocaps"},
        eval_split="val", splits=("val", "test"), metric="cider", statistics={"captions": "gather"},
        baseline=another_images_caption, evaluate_hook=evaluation_outputs, pipeline="beit3.pipelines:CaptioningPipeline", verb="caption",
        predict="beit3.tasks.predict:add_caption",
    )
    defaults = DEFAULTS
    raw_dataset = ImageTextDataset
    text_keys = ("input_ids", "attention_mask", "labels", "masked_positions")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self._tokenizer: Beit3Tokenizer | None = None

    @property
    def tokenizer(self) -> Beit3Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.options, self.cfg)
        return self._tokenizer

    def head_args(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                "mask_token_id": tok.mask_token_id, "label_smoothing": float(self.options["label_smoothing"])}

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return build_task_model(self.spec.model_class, cfg, self.tokenizer, **self.head_args())

    def train_index(self) -> list[str]:
        # NoCaps has no training split: captioners for it are trained on COCO, as in the release
        return self.options["train_index"] or [self.spec.index_file("train", "coco")]

    def processor(self, cfg: RunConfig, train: bool) -> SampleProcessor:
        o, max_len = self.options, int(self.options["max_text_len"])
        if not train:  # validation captions are generated: only the image is needed
            return SampleProcessor(image_transform(self.spec, cfg, False, o))
        masking = CaptionMasking(float(o["mask_prob"]), self.tokenizer.mask_token_id, self.tokenizer.vocab_size)
        return SampleProcessor(image_transform(self.spec, cfg, True, o, randaug=bool(o["randaug"])), self.tokenizer,
                               max_len, text_transform=masking)

    @cached_property
    def references(self) -> dict[int, list[str]]:
        """Ground-truth captions of the validation split, by image id (read from its index)."""
        refs: dict[int, list[str]] = {}
        for path in index_files(self.cfg.data.root, self.val_index()):
            for row in read_jsonl(path, ("image_id", "references")):
                refs[int(row["image_id"])] = list(row["references"])
        return refs

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        drop = float(self.options["drop_worst_ratio"]) if step >= int(self.options["drop_worst_after"]) else 0.0
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                    masked_positions=batch["masked_positions"], drop_worst_ratio=drop)
        return out.loss, {"masked_tokens": batch["masked_positions"].sum()}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
        """Beam-search captions of the batch's images, as (image id, caption)."""
        o = self.options
        inner = unwrap(model)
        sharded = hasattr(inner, "unshard")  # FSDP2: generate() bypasses the root's forward hooks
        if sharded:
            inner.unshard()
        try:
            keep = kept(batch)
            max_length = int(o["max_decode_len"] or o["max_text_len"])
            ids = inner.generate(batch["pixel_values"][keep], num_beams=int(o["num_beams"]), max_length=max_length,
                                 length_penalty=float(o["length_penalty"]),
                                 min_length=min(int(o["min_decode_len"]), max_length),
                                 mask_token_id=self.tokenizer.mask_token_id)
        finally:
            if sharded:
                inner.reshard()
        return {"captions": [(image_id, self.tokenizer.decode(row))
                             for image_id, row in zip(batch["image_id"][keep].tolist(), ids.tolist())]}

    def compute_metrics(self, stats: Mapping[str, Any]) -> dict[str, float]:
        predictions = dict(stats["captions"])
        refs = {k: [simple_tokenize(r) for r in self.references[k]] for k in predictions}
        score, _ = cider_d({k: simple_tokenize(v) for k, v in predictions.items()}, refs)
        return {"cider": score, "images": len(predictions)}
