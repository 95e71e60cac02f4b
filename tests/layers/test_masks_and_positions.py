import torch

from beit3.layers import caption_attention_mask, combine_attention_masks, resize_vision_pos_embed


def test_caption_mask_by_hand():
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(caption_attention_mask(2, 3), expected)


def test_combine_masks():
    padding = torch.tensor([[True, True, False]])
    assert combine_attention_masks(None, None, 4) is None
    assert combine_attention_masks(padding, None, 4).shape == (1, 1, 1, 3)
    custom = torch.ones(3, 3, dtype=torch.bool).tril()
    combined = combine_attention_masks(padding, custom, 4)
    assert torch.equal(combined[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    additive = combine_attention_masks(padding, torch.zeros(3, 3), 4)
    assert torch.isinf(additive[0, 0, :, 2]).all() and (additive[0, 0, :, :2] == 0).all()


def test_resize_positions_keeps_extra_rows_and_identity():
    table = torch.randn(3 + 16, 8)
    assert resize_vision_pos_embed(table, (4, 4)) is table
    bigger = resize_vision_pos_embed(table, (6, 2))
    assert bigger.shape == (3 + 12, 8)
    torch.testing.assert_close(bigger[:3], table[:3])
    constant = torch.ones(3 + 16, 8)
    torch.testing.assert_close(resize_vision_pos_embed(constant, (8, 8))[3:], torch.ones(64, 8))
