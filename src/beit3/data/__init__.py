"""Data for BEiT-3: task indexes and datasets, streamed pretraining data, and a built-in synthetic world.

* ``beit3.data.builders``: read official annotation files, write JSON-lines indexes (raw text kept).
* ``beit3.data.datasets``: map-style datasets over those indexes and the ``Collator``.
* ``beit3.data.transforms``: the training-time randomness of the official recipes (image
  augmentation, caption masking), kept out of the deterministic processor.
* ``beit3.data.streams`` / ``beit3.data.mixing``: sharded, shuffled, resumable pretraining streams
  and the loader that mixes images, texts and pairs in one batch.
* ``beit3.data.synthetic``: the seeded world of coloured shapes used by the demo and the tests.

Nothing here needs a tokenizer or the models: samples are raw and a processor is passed in.
"""
from beit3.data.datasets import (
    BadImageError,
    BadSampleWarning,
    Collator,
    ImageClassificationDataset,
    ImageTextDataset,
    NLVR2Dataset,
    VQADataset,
    load_image,
    vqa_targets,
)
from beit3.data.index import DataError, EmptyDatasetError, IndexFormatError, read_jsonl, write_jsonl
from beit3.data.mixing import MixingLoader, split_batch_size
from beit3.data.streams import ImageFolder, PositionTracker, SampleStream, TarShards, TextFiles
from beit3.data.transforms import TrainImageTransform, mask_caption_tokens, train_image_transform
from beit3.data.vqa_answers import answer_targets, build_answer_vocab, normalize_answer, soft_score

__all__ = [
    "BadImageError", "BadSampleWarning", "Collator", "DataError", "EmptyDatasetError", "ImageClassificationDataset",
    "ImageFolder", "ImageTextDataset", "IndexFormatError", "MixingLoader", "NLVR2Dataset", "PositionTracker",
    "SampleStream", "TarShards", "TextFiles", "TrainImageTransform", "VQADataset", "answer_targets",
    "build_answer_vocab", "load_image", "mask_caption_tokens", "normalize_answer", "read_jsonl", "soft_score",
    "split_batch_size", "train_image_transform", "vqa_targets", "write_jsonl",
]
