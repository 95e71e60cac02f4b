"""Behaviour of Beit3Model beyond parity: layouts, routing, masks, bad input, presets."""
import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import Beit3ForVisualQuestionAnswering, Beit3Model, count_parameters

TINY = Beit3Config.from_preset("tiny")


@pytest.fixture
def model():
    return Beit3Model(TINY).eval()


def test_base_preset_has_the_official_parameter_count():
    with torch.device("meta"):
        assert count_parameters(Beit3Model(Beit3Config.from_preset("base"))) == 220_987_392
        assert count_parameters(Beit3Model(Beit3Config.from_preset("large"))) == 672_702_464


def test_giant_preset_is_the_papers_1_9b_model():
    with torch.device("meta"):
        giant = Beit3Model(Beit3Config.from_preset("giant"))
    total = count_parameters(giant)
    assert 1.8e9 < total < 1.95e9
    by = lambda part: sum(p.numel() for n, p in giant.named_parameters() if part in n)  # noqa: E731
    # The paper's Table 2: 692M vision experts, 692M language experts, 52M VL experts, 317M attention.
    assert round(by(".vision.") / 1e6) == 693 and round(by(".text.") / 1e6) == 693
    assert round(by(".vl.") / 1e6) == 52 and round(by(".attn.") / 1e6) == 318
    assert sum(".vl." in n for n, _ in giant.named_parameters()) == 3 * 8  # top 3 layers: norm2 + ffn


def test_routing_is_explicit_and_stateless(model):
    """A text-only call after a joint call gives the same result as before it (no leftover routing)."""
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        model(pixel_values=images, input_ids=ids)
        after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_vision_only_uses_only_vision_experts(model):
    images = torch.randn(2, 3, 32, 32)
    model(pixel_values=images).last_hidden_state.sum().backward()
    for name, param in model.named_parameters():
        used = param.grad is not None and bool(param.grad.abs().sum() > 0)
        if ".text." in name or name.startswith(("text_", "vision_embed.mask_token")):
            assert not used, name
        elif ".vision." in name:
            assert used, name


@pytest.mark.parametrize("attention", ["decoupled", "shared"])
def test_vl_experts_serve_joint_input_only(attention):
    model = Beit3Model(TINY.replace(attention=attention, num_vl_layers=1)).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    model(pixel_values=images, input_ids=ids).last_hidden_state.sum().backward()
    vl = model.layers[1].ffn["vl"].fc1.weight
    assert vl.grad is not None and vl.grad.abs().sum() > 0
    assert model.layers[1].ffn["text"].fc1.weight.grad is None  # joint text went to VL in the top layer
    assert model.layers[0].ffn["text"].fc1.weight.grad.abs().sum() > 0  # but to L below
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert model.layers[1].ffn["vl"].fc1.weight.grad is None


def test_shared_layout_has_one_attention():
    model = Beit3Model(TINY.replace(attention="shared"))
    assert isinstance(model.layers[0].attn.qkv, torch.nn.Linear)
    assert isinstance(model.norm, torch.nn.LayerNorm)


def test_padding_does_not_leak(model):
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2)
    other = ids.clone()
    other[:, 4:] = torch.randint(0, 1000, (2, 2))
    with torch.no_grad():
        a = model(images, ids, mask).last_hidden_state[:, :-2]
        b = model(images, other, mask).last_hidden_state[:, :-2]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_image_mask_replaces_patches_with_the_mask_token(model):
    images = torch.randn(1, 3, 32, 32)
    image_mask = torch.zeros(1, 16, dtype=torch.bool)
    image_mask[0, 3] = True
    with torch.no_grad():
        model.vision_embed.mask_token.normal_()
        a = model.embed_image(images, image_mask)
        b = model.embed_image(images)
    changed = (a - b).abs().sum(-1)[0]
    assert changed[4] > 0 and changed.count_nonzero() == 1  # token 4 = patch 3 (CLS first)


def test_bool_and_float_masks_agree_and_block(model):
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 4))
    total = 17 + 4
    allowed = torch.ones(total, total, dtype=torch.bool)
    allowed[:17, 17:] = False  # image cannot see text
    additive = torch.zeros(total, total).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        a = model(images, ids, attn_mask=allowed).last_hidden_state
        b = model(images, ids, attn_mask=additive).last_hidden_state
        image_alone = model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # With image->text blocked, image tokens equal a vision-only pass.
    torch.testing.assert_close(a[:, :17], image_alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Beit3Model(TINY)
    checkpointed = Beit3Model(TINY.replace(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    for m in (plain, checkpointed):
        m(images, ids).last_hidden_state.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_config_flag_and_the_method_checkpoint_every_block_the_same_way():
    from torch.distributed._composable import checkpoint

    from beit3.layers import checkpoint_blocks

    assert all(checkpoint.state(block) is not None for block in Beit3Model(TINY.replace(gradient_checkpointing=True)).layers)
    assert all(checkpoint.state(block) is None for block in Beit3Model(TINY).layers)
    torch.manual_seed(0)
    plain = Beit3ForVisualQuestionAnswering(TINY, num_labels=5)
    checkpointed = Beit3ForVisualQuestionAnswering(TINY, num_labels=5)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert all(checkpoint.state(block) is not None for block in checkpointed.beit3.layers)
    checkpoint_blocks(checkpointed.beit3.layers)  # what the engine does on top: no error
    images, ids, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5)), torch.rand(2, 5)
    losses = [m(images, ids, labels=labels).loss for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)


def test_drop_path_is_stochastic_in_training_only():
    model = Beit3Model(TINY.replace(drop_path_rate=0.5))
    images = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(pixel_values=images).last_hidden_state, model(pixel_values=images).last_hidden_state)
    model.eval()
    torch.testing.assert_close(model(pixel_values=images).last_hidden_state,
                               model(pixel_values=images).last_hidden_state, rtol=0, atol=0)


def test_other_image_sizes_and_rectangles(model):
    for height, width in ((48, 48), (16, 40)):
        out = model(pixel_values=torch.randn(1, 3, height, width))
        assert out.last_hidden_state.shape == (1, 1 + (height // 8) * (width // 8), 64)


def test_hidden_states(model):
    out = model(input_ids=torch.randint(0, 1000, (1, 3)), output_hidden_states=True)
    assert len(out.hidden_states) == TINY.num_layers + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixel_values=torch.randn(1, 1, 32, 32)), "1 channels, the model expects 3"),
        (dict(pixel_values=torch.randn(1, 3, 4, 4)), "smaller than one 8x8 patch"),
        (dict(pixel_values=torch.randn(1, 3, 30, 32)), "not a multiple of the patch size"),
        (dict(pixel_values=torch.randn(3, 32, 32)), "must be \\(batch, channels, height, width\\)"),
        (dict(input_ids=torch.tensor([[1, 1000]])), "outside the vocabulary \\[0, 1000\\)"),
        (dict(input_ids=torch.tensor([[1, -1]])), "outside the vocabulary"),
        (dict(input_ids=torch.ones(1, 127, dtype=torch.long)), "longer than the position table allows \\(126\\)"),
        (dict(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.ones(3, 4, dtype=torch.long)), "batch sizes differ"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "attention_mask shape"),
        (dict(input_ids=torch.ones(1, 4)), "integer tensor"),
        (dict(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=torch.zeros(1, 2)), "all zeros"),
        (dict(), "pass pixel_values, input_ids or both"),
    ],
)
def test_bad_input_gets_a_clear_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_layer_ids_and_no_weight_decay():
    from beit3.models import Beit3ForVisualQuestionAnswering

    model = Beit3ForVisualQuestionAnswering(TINY, num_labels=3)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["beit3.text_embed.weight"] == 0 and ids["beit3.vision_pos_embed"] == 0
    assert ids["beit3.vision_embed.proj.weight"] == 0
    assert ids["beit3.layers.0.attn.qkv.vision.weight"] == 1 and ids["beit3.layers.1.ffn.text.fc2.bias"] == 2
    assert ids["head.3.weight"] == 3 and ids["pooler.dense.weight"] == 3
    assert model.no_weight_decay() == {"beit3.vision_pos_embed", "beit3.text_pos_embed",
                                       "beit3.vision_embed.cls_token", "beit3.vision_embed.mask_token"}


def test_magneto_init_scales_the_residual_branches():
    model = Beit3Model(Beit3Config.from_preset("tiny", num_layers=12, hidden_size=256, intermediate_size=1024))
    block = model.layers[0]
    q, v = block.attn.qkv["vision"].weight[:256], block.attn.qkv["vision"].weight[512:]
    ratio = (v.std() / q.std()).item()
    assert abs(ratio - TINY.replace(num_layers=12).magneto_gain) < 0.05  # sqrt(ln 24) = 1.78


@pytest.mark.parametrize("std", [0.02, 0.07])
def test_initializer_range_sets_every_weight_and_table(std):
    model = Beit3ForVisualQuestionAnswering(TINY.replace(initializer_range=std), num_labels=3)
    # truncated at +-2 std, so the measured std is 0.88 of the requested one
    for name in ("beit3.text_embed.weight", "beit3.vision_embed.proj.weight", "beit3.vision_pos_embed",
                 "beit3.text_pos_embed", "beit3.layers.0.attn.qkv.vision.weight", "pooler.dense.weight", "head.0.weight"):
        param = dict(model.named_parameters())[name]
        q_rows = param[: TINY.hidden_size] if "qkv" in name else param  # the value rows carry Magneto's gain
        assert abs(q_rows.std().item() / (0.88 * std) - 1) < 0.15, name
    assert model.beit3.vision_embed.cls_token.abs().max() > 0


def test_tiny_preset_scales_the_init_to_its_width():
    # 0.02 is ~0.55 / sqrt(768); the tiny (64-wide) preset keeps that relative scale
    assert Beit3Config.from_preset("tiny").initializer_range == pytest.approx(0.55 / 64 ** 0.5, rel=0.05)
    assert Beit3Config.from_preset("base").initializer_range == 0.02


def test_resize_token_embeddings_keeps_old_rows():
    from beit3.models import Beit3ForCaptioning

    model = Beit3ForCaptioning(TINY, mask_token_id=999)
    old_embed = model.beit3.text_embed.weight[:1000].clone()
    old_head = model.mlm_head.weight.clone()
    model.resize_token_embeddings(1200)
    assert model.beit3.text_embed.weight.shape[0] == 1200 and model.mlm_head.out_features == 1200
    assert model.config.vocab_size == 1200 and model.beit3.config.vocab_size == 1200
    torch.testing.assert_close(model.beit3.text_embed.weight[:1000], old_embed)
    torch.testing.assert_close(model.mlm_head.weight[:1000], old_head)


def test_resize_token_embeddings_resizes_only_the_text_vocabulary_heads():
    from beit3.models import Beit3ForPreTraining

    model = Beit3ForPreTraining(TINY, visual_vocab_size=50)
    assert model.vocab_heads == ("mlm_head",)
    old_head, old_bias, old_mim = model.mlm_head.weight.clone(), model.mlm_head.bias.clone(), model.mim_head
    model.resize_token_embeddings(800)
    assert model.beit3.text_embed.num_embeddings == 800 and model.mlm_head.out_features == 800
    assert model.config.vocab_size == 800 and model.beit3.config.vocab_size == 800
    torch.testing.assert_close(model.mlm_head.weight, old_head[:800])
    torch.testing.assert_close(model.mlm_head.bias, old_bias[:800])
    assert model.mim_head is old_mim  # its rows are visual tokens
    vqa = Beit3ForVisualQuestionAnswering(TINY, num_labels=7)
    vqa.resize_token_embeddings(1100)  # no vocabulary-sized head: only the embedding grows
    assert vqa.beit3.text_embed.num_embeddings == 1100 and vqa.head[3].out_features == 7
