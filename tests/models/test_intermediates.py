"""Beit3Model's timm-style vision API: forward_features and forward_intermediates.

The dense heads used to run their own copy of the block loop; `previous_feature_map` below is
that loop, kept as the oracle: the dense path through forward_intermediates must give the same
numbers to the bit, with and without windows.
"""
import pytest
import torch

from beit3.config import Beit3Config
from beit3.layers import expert, window_merge, window_partition
from beit3.models import Beit3Model
from beit3.models.dense import default_global_blocks, feature_map

TINY = Beit3Config.from_preset("tiny")  # 2 blocks, patch 8
CONFIGS = {
    "decoupled": TINY.replace(num_layers=4),
    "shared_with_vl": TINY.replace(num_layers=4, attention="shared", num_vl_layers=1),
    "no_final_norm": TINY.replace(num_layers=4, final_norm=False),
}


def previous_feature_map(beit3: Beit3Model, pixel_values: torch.Tensor, window_size: int,
                         global_blocks) -> torch.Tensor:
    """The dense path before forward_intermediates: patches without CLS, blocks (some windowed),
    the final norm, then a (B, D, H/P, W/P) view."""
    patch = beit3.config.patch_size
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    x = beit3.embed_image(pixel_values)[:, 1:]
    batch, _, dim = x.shape
    for index, block in enumerate(beit3.layers):
        if window_size and index not in global_blocks:
            windows, grid = window_partition(x.view(batch, rows, cols, dim), window_size)
            windows = block(windows, None, joint=False, attn_mask=None)[0]
            x = window_merge(windows, grid, window_size, (rows, cols)).reshape(batch, -1, dim)
        else:
            x = block(x, None, joint=False, attn_mask=None)[0]
    if beit3.norm is not None:
        x = expert(beit3.norm, "vision")(x)
    return x.transpose(1, 2).reshape(batch, dim, rows, cols)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("size", [(32, 32), (40, 88)])  # 40x88: a 5x11 grid, padded by every window size
@pytest.mark.parametrize("window_size, global_blocks", [(0, ()), (2, None), (3, None), (2, ()), (4, {0})])
def test_dense_features_equal_the_previous_block_loop(config_name, size, window_size, global_blocks):
    beit3 = Beit3Model(CONFIGS[config_name]).eval()
    images = torch.randn(2, 3, *size)
    if global_blocks is None:
        global_blocks = default_global_blocks(beit3.config.num_layers)
    with torch.no_grad():
        expected = previous_feature_map(beit3, images, window_size, global_blocks)
        features = feature_map(beit3, images, window_size, global_blocks)
    assert torch.equal(features, expected)
    assert features.stride() == expected.stride()  # the same memory layout reaches the pyramid's convs


@pytest.mark.parametrize("window_size", [0, 2])
def test_dense_features_and_gradients_equal_the_previous_loop_in_training(window_size):
    beit3 = Beit3Model(TINY.replace(num_layers=4, drop_path_rate=0.3)).train()
    images = torch.randn(2, 3, 40, 48)
    grads = []
    for run in (previous_feature_map, feature_map):
        torch.manual_seed(5)  # the same drop-path draws in both runs
        features = run(beit3, images, window_size, {1, 3})
        beit3.zero_grad()
        features.square().mean().backward()
        grads.append((features.detach(), [p.grad.clone() for p in beit3.parameters() if p.grad is not None]))
    (expected, expected_grads), (features, feature_grads) = grads
    assert torch.equal(features, expected)
    assert len(feature_grads) == len(expected_grads)
    assert all(torch.equal(a, b) for a, b in zip(feature_grads, expected_grads))


def test_forward_features_is_the_vision_only_forward():
    model = Beit3Model(TINY).eval()
    images = torch.randn(2, 3, 32, 48)
    image_mask = torch.rand(2, 24) < 0.4
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), model(pixel_values=images).last_hidden_state)
        assert torch.equal(model.forward_features(images, image_mask),
                           model(pixel_values=images, image_mask=image_mask).last_hidden_state)


def test_intermediates_are_the_hidden_states_without_cls():
    model = Beit3Model(CONFIGS["decoupled"]).eval()
    images = torch.randn(2, 3, 32, 40)  # a 4x5 grid
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True)
        final, intermediates = model.forward_intermediates(images, output_fmt="NLC")
        _, maps = model.forward_intermediates(images)
        _, normed = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NLC")
    assert torch.equal(final, out.last_hidden_state)
    assert len(intermediates) == 4 and len(maps) == 4
    for hidden, tokens, grid in zip(out.hidden_states[1:], intermediates, maps):
        assert torch.equal(tokens, hidden[:, 1:])  # (B, N, D)
        assert grid.shape == (2, 64, 4, 5)
        assert torch.equal(grid, tokens.transpose(1, 2).reshape(2, 64, 4, 5))
        assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 * 5 + 2])  # raster order: row 1, column 2
    assert torch.equal(normed[0], final[:, 1:])  # the last block through the final norm


def test_indices_follow_timm():
    model = Beit3Model(CONFIGS["decoupled"]).eval()  # 4 blocks
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        last_two = model.forward_intermediates(images, 2, output_fmt="NLC", intermediates_only=True)
        chosen = model.forward_intermediates(images, [-1, 0], output_fmt="NLC", intermediates_only=True)
    assert len(last_two) == 2 and torch.equal(last_two[0], every[2]) and torch.equal(last_two[1], every[3])
    assert len(chosen) == 2 and torch.equal(chosen[0], every[0]) and torch.equal(chosen[1], every[3])  # block order
    for bad in (0, 5, [4], [-5]):
        with pytest.raises(ValueError, match="out of range|asks for"):
            model.forward_intermediates(images, bad)


def test_intermediates_only_stops_after_the_last_block_asked_for():
    model = Beit3Model(CONFIGS["decoupled"]).eval()
    ran = []
    for index, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda module, args, index=index: ran.append(index))
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 32, 32), [1], intermediates_only=True)
        assert ran == [0, 1]
        ran.clear()
        model.forward_intermediates(torch.randn(1, 3, 32, 32), [1])  # the final output needs every block
        assert ran == [0, 1, 2, 3]


def test_dropping_the_cls_token_and_bad_arguments():
    model = Beit3Model(TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, keep_cls_token=False)
    assert final.shape == (2, 16, 64) and maps[-1].shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match="keep_cls_token=False"):
        model.forward_intermediates(images, window_size=2)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NHWC")
    with pytest.raises(ValueError, match="global_blocks"):
        model.forward_intermediates(images, keep_cls_token=False, window_size=2, global_blocks={2})
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_intermediates(torch.randn(1, 3, 30, 32))
