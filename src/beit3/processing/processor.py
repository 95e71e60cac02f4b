"""One call from raw images and text to the exact batch a BEiT-3 task model takes."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from beit3.processing.image import Beit3ImageProcessor, ImageInput
from beit3.processing.tokenizer import Beit3Tokenizer, TextInput

CONFIG_FILENAME = "processor_config.json"
TASKS = ("vqav2", "nlvr2", "captioning", "retrieval", "classification")
DEFAULT_CAPTIONING_MASK_PROB = 0.6  # the official --captioning_mask_prob default (docs use 0.7)


def mask_caption_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_prob: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official captioning corruption (``CaptioningDataset._masking_on_text_tokens``).

    For a row with ``n`` real tokens (BOS and EOS included) it picks
    ``max(1, min(int(n * mask_prob + 0.5), n - 1))`` distinct positions in ``1 .. n-1`` (BOS is
    never masked, EOS can be). Each picked token becomes ``mask_token_id`` with probability 0.8,
    stays itself with 0.1 and becomes a random id in ``[3, vocab_size - 1]`` with 0.1 (a range that
    includes ``<mask>``, as in the official code).

    Returns ``(masked_input_ids, masked_positions)``; ``masked_positions`` is bool ``(B, T)``.
    """
    if not 0 < mask_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    masked = input_ids.clone()
    positions = torch.zeros_like(input_ids, dtype=torch.bool)
    lengths = attention_mask.sum(dim=1).tolist()
    for row, n in enumerate(lengths):
        n = int(n)
        if n < 2:
            raise ValueError(f"row {row} has {n} real tokens; captions need at least BOS and EOS")
        count = max(1, min(int(n * mask_prob + 0.5), n - 1))
        picked = torch.randperm(n - 1, generator=generator)[:count] + 1
        draw = torch.rand(count, generator=generator)
        random_ids = torch.randint(3, vocab_size, (count,), generator=generator)
        replacement = torch.where(draw < 0.8, torch.full_like(random_ids, mask_token_id),
                                  torch.where(draw < 0.9, input_ids[row, picked], random_ids))
        masked[row, picked] = replacement
        positions[row, picked] = True
    return masked, positions


class Beit3Processor:
    """Tokenizer + image processor behind one ``__call__`` that knows each task's inputs.

    Args:
        tokenizer: the model's :class:`Beit3Tokenizer`.
        image_processor: the model's :class:`Beit3ImageProcessor` (its ``train`` flag decides
            whether images are augmented).
        max_length: default text length (64 in every official recipe; 32 for captioning training).
    """

    def __init__(self, tokenizer: Beit3Tokenizer, image_processor: Beit3ImageProcessor,
                 max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length

    def __call__(
        self,
        images: ImageInput | Sequence[Any] | None = None,
        text: TextInput | Sequence[TextInput] | None = None,
        task: str = "vqav2",
        max_length: int | None = None,
        train: bool = False,
        captioning_mask_prob: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Build a batch for ``task``.

        * ``classification``: images -> ``pixel_values``.
        * ``vqav2``: images and questions -> ``pixel_values``, ``input_ids``, ``attention_mask``.
        * ``nlvr2``: a list of image pairs and sentences -> ``pixel_values`` ``(B, 2, 3, S, S)``,
          ``input_ids``, ``attention_mask``.
        * ``retrieval``: images, texts or both (the two towers run separately).
        * ``captioning``: images (and captions). With ``train=True`` or a ``captioning_mask_prob``
          the captions are corrupted as in official training: ``input_ids`` (masked), ``labels``
          (original ids), ``masked_positions`` (bool), ``attention_mask``; ``generator`` seeds it.

        Texts are strings or id lists without special tokens (as in the official index files).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
        mask_captions = task == "captioning" and (train or captioning_mask_prob is not None)
        needs_images = task in ("classification", "vqav2", "nlvr2", "captioning")
        needs_text = task in ("vqav2", "nlvr2") or mask_captions
        if needs_images and images is None:
            raise ValueError(f"task {task!r} needs images")
        if needs_text and text is None:
            raise ValueError(f"task {task!r} needs text" + (" (captions to mask)" if mask_captions else ""))
        if task == "classification" and text is not None:
            raise ValueError("task 'classification' takes images only")
        if task == "retrieval" and images is None and text is None:
            raise ValueError("task 'retrieval' needs images, text or both")

        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            batch["pixel_values"] = self._pair_pixels(images) if task == "nlvr2" else \
                self.image_processor(images)["pixel_values"]
        if text is not None:
            encoded = self.tokenizer(text, max_length=max_length or self.max_length)
            batch.update(encoded)
        if "pixel_values" in batch and "input_ids" in batch and \
                len(batch["pixel_values"]) != len(batch["input_ids"]):
            raise ValueError(f"got {len(batch['pixel_values'])} images (or pairs) but "
                             f"{len(batch['input_ids'])} texts")
        if mask_captions:
            prob = DEFAULT_CAPTIONING_MASK_PROB if captioning_mask_prob is None else captioning_mask_prob
            labels = batch["input_ids"]
            batch["input_ids"], batch["masked_positions"] = mask_caption_tokens(
                labels, batch["attention_mask"], prob, self.tokenizer.mask_token_id,
                self.tokenizer.vocab_size, generator)
            batch["labels"] = labels
        return batch

    def _pair_pixels(self, pairs: Any) -> torch.Tensor:
        if isinstance(pairs, (list, tuple)) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple)):
            pairs = [pairs]  # a single pair
        if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError("task 'nlvr2' takes images as a list of (left, right) pairs")
        flat = [image for pair in pairs for image in pair]
        pixels = self.image_processor(flat)["pixel_values"]
        return pixels.view(len(pairs), 2, *pixels.shape[1:])  # (B, 2, 3, S, S)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tokenizer={self.tokenizer!r}, "
                f"image_processor={self.image_processor!r}, max_length={self.max_length})")

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[Path]:
        """Write the tokenizer, the image processor config and ``processor_config.json``."""
        directory = Path(save_directory)
        written = self.tokenizer.save_pretrained(directory)
        written.append(self.image_processor.save_pretrained(directory))
        config = directory / CONFIG_FILENAME
        config.write_text(json.dumps({"processor_class": type(self).__name__,
                                      "max_length": self.max_length}, indent=2) + "\n",
                          encoding="utf-8")
        written.append(config)
        return written

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Beit3Processor":
        """Load what :meth:`save_pretrained` wrote (typically a model directory)."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"no processor directory at '{directory}'")
        max_length = 64
        config_file = directory / CONFIG_FILENAME
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            unknown = set(config) - {"processor_class", "max_length"}
            if unknown:
                raise ValueError(f"'{config_file}' has unknown keys {sorted(unknown)}")
            max_length = int(config.get("max_length", max_length))
        return cls(Beit3Tokenizer.from_pretrained(directory),
                   Beit3ImageProcessor.from_pretrained(directory), max_length=max_length)
