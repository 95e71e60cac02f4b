"""Data for BEiT-3: task indexes and datasets, streamed pretraining data, and a built-in synthetic world.

* ``beit3.data.builders``: read official annotation files, write JSON-lines indexes (raw text kept).
* ``beit3.data.datasets``: map-style datasets over those indexes and the ``Collator``.
* ``beit3.data.transforms``: the training-time randomness of the official recipes (image
  augmentation, caption masking), kept out of the deterministic processor.
* ``beit3.data.streams`` / ``beit3.data.mixing``: sharded, shuffled, resumable pretraining streams
  and the loader that mixes images, texts and pairs in one batch.
* ``beit3.data.synthetic``: the seeded world of coloured shapes used by the demo and the tests.

Nothing here needs a tokenizer or the models: samples are raw and a processor is passed in.
The names below are imported on first use, so ``import beit3.data.builders`` (``beit3 data``)
does not load torch and torchvision.
"""
from beit3._lazy import by_module, lazy_exports

_EXPORTS = {
    "beit3.data.datasets": ("BadImageError", "BadSampleWarning", "Collator", "ImageClassificationDataset",
                            "ImageTextDataset", "NLVR2Dataset", "VQADataset", "load_image", "vqa_targets"),
    "beit3.data.index": ("DataError", "EmptyDatasetError", "IndexFormatError", "read_jsonl", "write_jsonl"),
    "beit3.data.mixing": ("MixingLoader", "split_batch_size"),
    "beit3.data.streams": ("ImageFolder", "PositionTracker", "SampleStream", "TarShards", "TextFiles"),
    "beit3.data.transforms": ("TrainImageTransform", "mask_caption_tokens", "train_image_transform"),
    "beit3.data.vqa_answers": ("answer_targets", "build_answer_vocab", "normalize_answer", "soft_score"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, by_module(_EXPORTS))
