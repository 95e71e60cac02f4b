"""Task heads against the official definitions (official-beit3.md §2), written here as plain
functions of the official state dict on top of the torchscale backbone."""
import math

import pytest
import torch
import torch.nn.functional as F

from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from tests.models.reference import official_checkpoint, torchscale_beit3

pytestmark = pytest.mark.reference
D = 64


def rand(*shape):
    return torch.randn(*shape) * 0.1


def ln(x, state, name):
    return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def text():
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def load(cls, tmp_path, backbone, heads, **kwargs):
    return cls.from_pretrained(official_checkpoint(tmp_path, backbone, heads), num_heads=4, **kwargs).eval()


def test_classification(tmp_path, images):
    backbone = torchscale_beit3(normalize_output=False)
    heads = {"fc_norm.weight": 1 + rand(D), "fc_norm.bias": rand(D), "head.weight": rand(7, D), "head.bias": rand(7)}
    model = load(Beit3ForImageClassification, tmp_path, backbone, heads)
    assert model.num_labels == 7 and not model.config.final_norm
    with torch.no_grad():
        x = backbone(visual_tokens=images)["encoder_out"]
        expected = linear(ln(x[:, 1:].mean(1), heads, "fc_norm"), heads, "head")
        got = model(images).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([1, 5])
    smoothed = model(images, labels=labels).loss
    torch.testing.assert_close(smoothed, F.cross_entropy(expected, labels, label_smoothing=0.1), atol=1e-5, rtol=1e-5)


def test_vqa(tmp_path, images, text):
    ids, mask = text
    backbone = torchscale_beit3(normalize_output=False)
    heads = {"pooler.norm.weight": 1 + rand(D), "pooler.norm.bias": rand(D), "pooler.dense.weight": rand(D, D),
             "pooler.dense.bias": rand(D), "head.0.weight": rand(2 * D, D), "head.0.bias": rand(2 * D),
             "head.1.weight": 1 + rand(2 * D), "head.1.bias": rand(2 * D), "head.3.weight": rand(11, 2 * D),
             "head.3.bias": rand(11)}
    model = load(Beit3ForVisualQuestionAnswering, tmp_path, backbone, heads)
    assert model.num_labels == 11
    with torch.no_grad():
        x = backbone(textual_tokens=ids, visual_tokens=images, text_padding_position=mask == 0)["encoder_out"]
        pooled = torch.tanh(linear(ln(x[:, 0], heads, "pooler.norm"), heads, "pooler.dense"))
        h = F.gelu(ln(linear(pooled, heads, "head.0"), heads, "head.1"))
        expected = linear(h, heads, "head.3")
        got = model(images, ids, mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    targets = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0, 0, 0, 0, 0, 0, 0]).repeat(2, 1)
    official_loss = F.binary_cross_entropy_with_logits(expected, targets) * 11  # mean x num_labels
    torch.testing.assert_close(model(images, ids, mask, labels=targets).loss, official_loss, atol=1e-5, rtol=1e-5)


def test_nlvr2(tmp_path, images, text):
    ids, mask = text
    backbone = torchscale_beit3()
    heads = {"head.norm1.weight": 1 + rand(4 * D), "head.norm1.bias": rand(4 * D),
             "head.dense1.weight": rand(2 * D, 4 * D), "head.dense1.bias": rand(2 * D),
             "head.norm2.weight": 1 + rand(2 * D), "head.norm2.bias": rand(2 * D),
             "head.dense2.weight": rand(2, 2 * D), "head.dense2.bias": rand(2)}
    model = load(Beit3ForVisualReasoning, tmp_path, backbone, heads)
    right = torch.randn_like(images)
    with torch.no_grad():
        # The release: cat(image_a, image_b) along the batch, text repeated, one joint pass.
        out = backbone(textual_tokens=torch.cat([ids, ids]), visual_tokens=torch.cat([images, right]),
                       text_padding_position=torch.cat([mask, mask]) == 0)
        x, split = out["encoder_out"], out["multiway_split_position"]
        pooled = torch.cat([x[:, 0], x[:, split]], dim=-1)
        joined = torch.cat([pooled[:2], pooled[2:]], dim=-1)
        h = F.gelu(ln(linear(ln(joined, heads, "head.norm1"), heads, "head.dense1"), heads, "head.norm2"))
        expected = linear(h, heads, "head.dense2")
        got = model(torch.stack([images, right], dim=1), ids, mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_retrieval(tmp_path, images, text):
    ids, mask = text
    backbone = torchscale_beit3()
    heads = {"vision_head.weight": rand(D, D), "language_head.weight": rand(D, D), "logit_scale": torch.tensor(2.0)}
    model = load(Beit3ForImageTextRetrieval, tmp_path, backbone, heads)
    with torch.no_grad():
        image_cls = backbone(visual_tokens=images)["encoder_out"][:, 0]
        text_bos = backbone(textual_tokens=ids, text_padding_position=mask == 0)["encoder_out"][:, 0]
        expected_image = F.normalize(image_cls @ heads["vision_head.weight"].t(), dim=-1)
        expected_text = F.normalize(text_bos @ heads["language_head.weight"].t(), dim=-1)
        out = model(images, ids, mask)
    torch.testing.assert_close(out.image_embeds, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, expected_text, atol=1e-5, rtol=1e-5)
    logits = math.exp(2.0) * expected_image @ expected_text.t()
    expected_loss = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.t(), torch.arange(2))) / 2
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_captioning_logits_and_loss(tmp_path, images, text):
    ids, mask = text
    backbone = torchscale_beit3()
    heads = {"mlm_head.weight": rand(100, D), "mlm_head.bias": rand(100)}
    model = load(Beit3ForCaptioning, tmp_path, backbone, heads, mask_token_id=99)
    num_image, length = 17, ids.shape[1]
    # The release's mask: long, 1 = blocked; image->text blocked, text->text causal.
    allowed = torch.zeros(num_image + length, num_image + length, dtype=torch.long)
    allowed[:, :num_image] = 1
    allowed[num_image:, num_image:] = torch.ones(length, length, dtype=torch.long).tril()
    with torch.no_grad():
        x = backbone(textual_tokens=ids, visual_tokens=images, text_padding_position=mask == 0,
                     attn_mask=1 - allowed)["encoder_out"]
        expected = linear(x[:, num_image:], heads, "mlm_head")
        got = model(images, ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)

    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[0, [1, 3]] = True
    positions[1, 2] = True
    eps, vocab = 0.1, 100
    target = torch.full((3, vocab), eps / (vocab - 1))
    picked = ids[positions]
    target[torch.arange(3), picked] = 1 - eps
    official = F.kl_div(F.log_softmax(expected[positions], -1), target, reduction="none").sum(-1).mean()
    loss = model(images, ids, mask, labels=ids, masked_positions=positions).loss
    torch.testing.assert_close(loss, official, atol=1e-5, rtol=1e-5)
