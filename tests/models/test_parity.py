"""Numerical parity with the released backbone (torchscale 0.3.0 BEiT3), loaded through our
official-checkpoint path."""
import pytest
import torch

from beit3.models import Beit3Model
from tests.models.reference import official_checkpoint, torchscale_beit3

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = torchscale_beit3()
    ours = Beit3Model.from_pretrained(official_checkpoint(tmp_path_factory.mktemp("ckpt"), reference)).eval()
    return reference, ours


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 100, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    return images, ids, attention_mask


def test_config_is_inferred_from_the_tensors(pair):
    _, ours = pair
    c = ours.config
    # Heads are not stored in a checkpoint: they default to width / 64 like every released model.
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (64, 2, 1, 256)
    assert (c.image_size, c.patch_size, c.vocab_size, c.max_text_positions) == (32, 8, 100, 1024)
    assert c.final_norm and c.attention == "decoupled" and c.num_vl_layers == 0


def _reference_config(tmp_path, reference):
    return Beit3Model.from_pretrained(official_checkpoint(tmp_path, reference), num_heads=4).eval()


@pytest.fixture(scope="module")
def ours4(tmp_path_factory):
    reference = torchscale_beit3()
    return reference, _reference_config(tmp_path_factory.mktemp("ckpt4"), reference)


def test_image_only(ours4, inputs):
    reference, ours = ours4
    images, _, _ = inputs
    with torch.no_grad():
        expected = reference(visual_tokens=images)["encoder_out"]
        got = ours(pixel_values=images).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_text_only_with_padding(ours4, inputs):
    reference, ours = ours4
    _, ids, attention_mask = inputs
    with torch.no_grad():
        expected = reference(textual_tokens=ids, text_padding_position=attention_mask == 0)["encoder_out"]
        got = ours(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_image_and_text_with_padding(ours4, inputs):
    reference, ours = ours4
    images, ids, attention_mask = inputs
    with torch.no_grad():
        expected = reference(textual_tokens=ids, visual_tokens=images,
                             text_padding_position=attention_mask == 0)["encoder_out"]
        out = ours(pixel_values=images, input_ids=ids, attention_mask=attention_mask)
    assert out.vision_len == 17
    real = torch.cat([torch.ones(3, 17, dtype=torch.bool), attention_mask.bool()], dim=1)
    torch.testing.assert_close(out.last_hidden_state[real], expected[real], atol=1e-5, rtol=1e-5)


def test_custom_mask_matches_reference_long_mask(ours4, inputs):
    """Our bool mask (True = attend) equals the reference's long mask (1 = blocked)."""
    reference, ours = ours4
    images, ids, _ = inputs
    total = 17 + ids.shape[1]
    allowed = torch.rand(total, total, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed |= torch.eye(total, dtype=torch.bool)
    with torch.no_grad():
        expected = reference(textual_tokens=ids, visual_tokens=images, attn_mask=(~allowed).long())["encoder_out"]
        got_bool = ours(pixel_values=images, input_ids=ids, attn_mask=allowed).last_hidden_state
        additive = torch.zeros(total, total).masked_fill(~allowed, float("-inf"))
        got_float = ours(pixel_values=images, input_ids=ids, attn_mask=additive).last_hidden_state
    torch.testing.assert_close(got_bool, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_float, expected, atol=1e-5, rtol=1e-5)


def test_other_image_size_interpolates_positions_like_the_official_loader(tmp_path):
    """A 32px checkpoint loaded at 48px: our run-time interpolation equals a reference built at 48px
    whose table was resized the official way (3 leading rows kept, grid bicubic)."""
    small = torchscale_beit3()
    big = torchscale_beit3(img_size=48)
    state = small.state_dict()
    table = state["encoder.embed_positions.A.weight"]
    grid = table[3:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    state["encoder.embed_positions.A.weight"] = torch.cat([table[:3], grid.permute(0, 2, 3, 1).reshape(36, -1)])
    big.load_state_dict(state)
    loaded_at_48 = Beit3Model.from_pretrained(official_checkpoint(tmp_path, small), num_heads=4, image_size=48).eval()
    at_32 = Beit3Model.from_pretrained(official_checkpoint(tmp_path, small), num_heads=4).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = big(visual_tokens=images)["encoder_out"]
        torch.testing.assert_close(loaded_at_48(pixel_values=images).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at_32(pixel_values=images).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
