import math

import pytest
import torch

from beit3.config import Beit3Config
from beit3.catalogue import iter_tasks
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForPreTraining,
    Beit3Model,
)
from beit3.pretraining import BlockMaskingGenerator, mask_text_tokens

LAYOUTS = {
    "decoupled": Beit3Config.from_preset("tiny"),
    "shared": Beit3Config.from_preset("tiny", attention="shared", num_vl_layers=1),
}
VISUAL_VOCAB = 512


def make_batch(config, batch=4, text_len=12, seed=0, pair_mask_image=True):
    g = torch.Generator().manual_seed(seed)
    grid = config.grid_size
    masker = BlockMaskingGenerator.from_ratio(grid, 0.4, min_num_patches=2)
    ids = torch.randint(4, config.vocab_size - 1, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    attn = torch.ones_like(ids)
    attn[0, 8:] = 0
    ids[0, 8:] = 1
    ids[0, 7] = 2
    kw = dict(mask_token_id=config.vocab_size - 1, vocab_size=config.vocab_size, special_ids=(0, 1, 2), generator=g)
    text_ids, text_labels = mask_text_tokens(ids, attn, 0.15, **kw)
    pair_ids, pair_labels = mask_text_tokens(ids, attn, 0.5, **kw)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    codes = torch.randint(0, VISUAL_VOCAB, (batch, grid * grid), generator=g)
    out = dict(
        image_pixel_values=pixels, image_mask=masker(batch, generator=seed), image_labels=codes,
        text_input_ids=text_ids, text_attention_mask=attn, text_labels=text_labels,
        pair_pixel_values=pixels, pair_input_ids=pair_ids, pair_attention_mask=attn, pair_labels=pair_labels,
    )
    if pair_mask_image:
        out.update(pair_image_mask=masker(batch, generator=seed + 1), pair_image_labels=codes)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_streams_losses_start_near_chance_and_backpropagate(layout):
    config = LAYOUTS[layout]
    model = Beit3ForPreTraining(config, visual_vocab_size=VISUAL_VOCAB)
    out = model(**make_batch(config))
    assert set(out.streams()) == {"text_mlm", "pair_mlm", "image_mim", "pair_mim"}
    for name, stream in out.streams().items():
        vocab = config.vocab_size if name.endswith("mlm") else VISUAL_VOCAB
        assert stream.logits.shape == (stream.num_targets, vocab)
        # at init each head is close to uniform: ln(V), slightly above
        assert abs(stream.loss.item() - math.log(vocab)) < 0.3, (name, stream.loss.item())
        assert 0 <= stream.accuracy.item() <= 1
    assert torch.allclose(out.loss, sum(s.loss for s in out.streams().values()))
    out.loss.backward()
    assert model.mlm_head.weight.grad.abs().sum() > 0 and model.mim_head.weight.grad.abs().sum() > 0
    assert model.beit3.vision_embed.mask_token.grad.abs().sum() > 0
    if layout == "shared":  # the pair stream goes through the vision-language expert of the top layer
        assert model.beit3.layers[-1].ffn["vl"].fc1.weight.grad.abs().sum() > 0


def test_targets_are_the_masked_positions_only():
    config = LAYOUTS["decoupled"]
    model = Beit3ForPreTraining(config, visual_vocab_size=VISUAL_VOCAB).eval()
    batch = make_batch(config, pair_mask_image=False)
    out = model(**batch)
    assert out.pair_mim is None
    assert out.image_mim.num_targets == int(batch["image_mask"].sum())
    assert out.text_mlm.num_targets == int((batch["text_labels"] != -100).sum())
    assert out.pair_mlm.num_targets == int((batch["pair_labels"] != -100).sum())
    # streams are independent: one stream alone gives the same loss
    alone = model(text_input_ids=batch["text_input_ids"], text_attention_mask=batch["text_attention_mask"],
                  text_labels=batch["text_labels"])
    assert torch.allclose(alone.loss, out.text_mlm.loss) and alone.image_mim is None
    with pytest.raises(ValueError, match="at least one stream"):
        model()
    with pytest.raises(ValueError, match="image_mask and image_labels"):
        model(image_pixel_values=batch["image_pixel_values"])


def test_learns_to_copy_a_visible_token():
    """A few steps on a task the heads can solve: the MLM loss falls well below chance."""
    config = Beit3Config.from_preset("tiny", vocab_size=32, num_layers=1)
    model = Beit3ForPreTraining(config, visual_vocab_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        word = torch.randint(4, 31, (16, 1), generator=g)
        ids = torch.cat([torch.zeros(16, 1, dtype=torch.long), word, word, torch.full((16, 1), 2)], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        corrupted = ids.clone()
        corrupted[:, 2] = 31
        loss = model(text_input_ids=corrupted, text_attention_mask=torch.ones_like(ids), text_labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * math.log(32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_weights_load_into_every_task_model(tmp_path, layout):
    config = LAYOUTS[layout]
    model = Beit3ForPreTraining(config, visual_vocab_size=VISUAL_VOCAB)
    model.save_pretrained(tmp_path)
    again = Beit3ForPreTraining.from_pretrained(tmp_path)
    assert again.visual_vocab_size == VISUAL_VOCAB
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    backbone = model.beit3.state_dict()
    for cls in (spec.model_class for spec in iter_tasks("finetune", having="head_keys")):
        extra = {"mask_token_id": config.vocab_size - 1} if cls is Beit3ForCaptioning else {}
        task_model = cls.from_pretrained(tmp_path, init_head=True, **extra)
        task_state = task_model.beit3.state_dict()
        for key, value in task_state.items():
            assert torch.equal(value, backbone[key]), (cls.__name__, key)
        assert task_model.config.attention == config.attention
    bare = Beit3Model.from_pretrained(tmp_path)
    assert all(torch.equal(v, backbone[k]) for k, v in bare.state_dict().items())


def test_resize_token_embeddings_resizes_the_mlm_head():
    model = Beit3ForPreTraining(LAYOUTS["decoupled"], visual_vocab_size=VISUAL_VOCAB)
    old = model.mlm_head.weight.detach().clone()
    model.resize_token_embeddings(1010)
    assert model.mlm_head.weight.shape == (1010, 64)
    assert torch.equal(model.mlm_head.weight[:1000], old)
