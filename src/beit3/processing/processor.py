"""One call from raw images and text to the model inputs: ``pixel_values``, ``input_ids``, ``attention_mask``.

The processor knows no task: what a batch holds follows from what is given. Training-only steps
(image augmentation, caption masking) live in :mod:`beit3.data.transforms`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from beit3.processing.batch import BatchEncoding
from beit3.processing.image import Beit3ImageProcessor, ImageInput
from beit3.processing.tokenizer import Beit3Tokenizer, TextInput

CONFIG_FILENAME = "processor_config.json"


class Beit3Processor:
    """Tokenizer + image processor behind one ``__call__``.

    Args:
        tokenizer: the model's :class:`Beit3Tokenizer`.
        image_processor: the model's :class:`Beit3ImageProcessor` (deterministic).
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
        *,
        padding: bool | str = "max_length",
        truncation: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """Images, text or both -> a batch (a dict with ``.to(device)``), as Hugging Face processors.

        * ``images``: one image or a list -> ``pixel_values`` ``(B, 3, S, S)``; a list of
          ``(left, right)`` pairs (NLVR2) -> ``(B, 2, 3, S, S)``.
        * ``text``: strings or id lists without special tokens (as in the official index files)
          -> ``input_ids`` and ``attention_mask`` ``(B, L)``: ``L = max_length`` (default: the
          processor's, 64) with ``padding="max_length"``, the longest text with ``padding=True``.
        * ``return_tensors``: ``"pt"`` (the default; ``None`` means the same) or ``"np"``.

        Given both, there must be one text per image (or pair).
        """
        if images is None and text is None:
            raise ValueError("nothing to process: give images, text or both")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        batch = BatchEncoding()
        if images is not None:
            batch["pixel_values"] = self._pixels(images)
        if text is not None:
            batch.update(self.tokenizer(text, padding=padding, truncation=truncation,
                                        max_length=max_length or self.max_length, return_tensors="pt"))
        if "pixel_values" in batch and "input_ids" in batch and \
                len(batch["pixel_values"]) != len(batch["input_ids"]):
            raise ValueError(f"got {len(batch['pixel_values'])} images (or pairs) but "
                             f"{len(batch['input_ids'])} texts")
        if return_tensors == "np":
            return BatchEncoding({key: value.numpy() for key, value in batch.items()})
        return batch

    def _pixels(self, images: Any) -> torch.Tensor:
        """Single images -> (B, 3, S, S); a list whose elements are all pairs -> (B, 2, 3, S, S)."""
        pairs = [isinstance(item, (list, tuple)) for item in images] if isinstance(images, (list, tuple)) else []
        if not any(pairs):
            return self.image_processor(images)["pixel_values"]
        if not all(pairs):
            raise ValueError("images mix (left, right) pairs and single images; give one kind")
        for pair in images:
            if len(pair) != 2:
                raise ValueError(f"an image pair holds 2 images (left, right), got {len(pair)}")
        pixels = self.image_processor([image for pair in images for image in pair])["pixel_values"]
        return pixels.view(len(images), 2, *pixels.shape[1:])  # (B, 2, 3, S, S)

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
