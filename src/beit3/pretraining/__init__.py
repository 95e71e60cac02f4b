"""BEiT-3 pretraining: masking, the VQ-KD visual tokenizer and the masked-data-modeling task.

``beit3.models.Beit3ForPreTraining`` holds the heads; this package holds what produces their
targets and the training task the engine runs (``beit3 pretrain``).
"""
from beit3.pretraining.masking import Block, BlockMaskingGenerator, mask_text_tokens

__all__ = ["Block", "BlockMaskingGenerator", "mask_text_tokens"]
