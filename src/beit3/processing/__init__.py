"""Text and image processing: tokenizer, deterministic image pipelines and the processor.

Everything here turns raw inputs into the tensors BEiT-3 models take, the same on every call, so
it is what a model folder saves for inference; training augmentation and caption masking live in
``beit3.data.transforms``. Nothing here imports the model, data or training packages (the
optional model-resize helper imports them lazily).
"""
from beit3.processing.augment import RandomAugment
from beit3.processing.image import Beit3ImageProcessor, load_image
from beit3.processing.processor import Beit3Processor
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
    "resize_model_for_tokenizer",
    "split_long_line",
    "train_tokenizer",
]
