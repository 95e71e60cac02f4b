"""Text and image processing: tokenizer, deterministic image pipelines and the processor.

Everything here turns raw inputs into the tensors BEiT-3 models take, the same on every call, so
it is what a model folder saves for inference; training augmentation and caption masking live in
``beit3.data.transforms``. Nothing here imports the model, data or training packages (the
optional model-resize helper imports them lazily). Names are imported on first use, so the
``beit3 tokenizer`` command starts without torchvision.
"""
from beit3._lazy import lazy_exports

_MODULE_OF = {
    "RandomAugment": "beit3.processing.augment",
    "Beit3ImageProcessor": "beit3.processing.image",
    "load_image": "beit3.processing.image",
    "Beit3Processor": "beit3.processing.processor",
    "Beit3Tokenizer": "beit3.processing.tokenizer",
    "extend_tokenizer": "beit3.processing.tokenizer_training",
    "resize_model_for_tokenizer": "beit3.processing.tokenizer_training",
    "split_long_line": "beit3.processing.tokenizer_training",
    "train_tokenizer": "beit3.processing.tokenizer_training",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _MODULE_OF)
