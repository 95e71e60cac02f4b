"""Text and image processing: tokenizer, image pipelines and the task processor.

Everything here turns raw inputs into the tensors BEiT-3 models take; nothing imports the
model, data or training packages (the optional model-resize helper imports them lazily).
"""
from beit3.processing.augment import RandomAugment
from beit3.processing.image import Beit3ImageProcessor, load_image
from beit3.processing.processor import Beit3Processor, mask_caption_tokens
from beit3.processing.tokenizer import Beit3Tokenizer
from beit3.processing.tokenizer_training import (
    extend_tokenizer,
    resize_model_for_tokenizer,
    split_long_line,
    train_tokenizer,
)

__all__ = [
    "Beit3ImageProcessor",
    "Beit3Processor",
    "Beit3Tokenizer",
    "RandomAugment",
    "extend_tokenizer",
    "load_image",
    "mask_caption_tokens",
    "resize_model_for_tokenizer",
    "split_long_line",
    "train_tokenizer",
]
