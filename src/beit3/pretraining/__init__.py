"""BEiT-3 pretraining: masking, the VQ-KD visual tokenizer and the masked-data-modeling task.

``beit3.models.Beit3ForPreTraining`` holds the heads; this package holds what produces their
targets and the training task the engine runs (``beit3 pretrain``).
"""
from beit3.pretraining.masking import Block, BlockMaskingGenerator, mask_text_tokens
from beit3.pretraining.vqkd import VQKD, VQKDConfig, load_beitv2_tokenizer

__all__ = ["Block", "BlockMaskingGenerator", "VQKD", "VQKDConfig", "load_beitv2_tokenizer", "mask_text_tokens"]
