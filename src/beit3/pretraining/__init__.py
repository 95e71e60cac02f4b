"""BEiT-3 pretraining: masking, the VQ-KD visual tokenizer and the masked-data-modeling task.

``beit3.models.Beit3ForPreTraining`` holds the heads; this package holds what produces their
targets and the training task the engine runs (``beit3 pretrain``).
"""
from beit3._lazy import by_module, lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, by_module({
    "beit3.pretraining.masking": ("Block", "BlockMaskingGenerator", "mask_text_tokens"),
    "beit3.pretraining.vqkd": ("VQKD", "VQKDConfig", "load_beitv2_tokenizer"),
}))
