"""Building blocks of the Multiway Transformer: plain PyTorch, one concept a file."""
from beit3.layers.attention import Attention, KVCache
from beit3.layers.checkpointing import checkpoint_blocks
from beit3.layers.drop_path import drop_path_mask
from beit3.layers.embeddings import VisionEmbedding, resize_vision_pos_embed
from beit3.layers.feedforward import FeedForward
from beit3.layers.masks import caption_attention_mask, combine_attention_masks
from beit3.layers.multiway import Experts, expert
from beit3.layers.windows import window_merge, window_partition

__all__ = [
    "Attention", "KVCache", "checkpoint_blocks", "drop_path_mask", "VisionEmbedding", "resize_vision_pos_embed",
    "FeedForward", "caption_attention_mask", "combine_attention_masks", "Experts", "expert",
    "window_merge", "window_partition",
]
