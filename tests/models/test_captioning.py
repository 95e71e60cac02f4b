import json

import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import Beit3ForCaptioning
from beit3.models.captioning import captioning_loss

TINY = Beit3Config.from_preset("tiny", vocab_size=50)


@pytest.mark.parametrize("attention, vl", [("decoupled", 0), ("shared", 1)])
def test_generate_with_cache_equals_recomputing(attention, vl):
    torch.manual_seed(3)
    model = Beit3ForCaptioning(TINY.replace(attention=attention, num_vl_layers=vl), mask_token_id=49).eval()
    with torch.no_grad():  # sharper distributions: beams really diverge
        model.mlm_head.weight.mul_(20)
    images = torch.randn(3, 3, 32, 32)
    cached = model.generate(images, num_beams=3, max_length=10)
    recomputed = model.generate(images, num_beams=3, max_length=10, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert (cached[:, 0] == 0).all() and cached.shape[1] <= 10
    for row in cached.tolist():
        assert 2 in row  # every caption ends with EOS


def test_greedy_generate_matches_a_hand_rolled_greedy_decoder():
    torch.manual_seed(4)
    model = Beit3ForCaptioning(TINY, mask_token_id=49, eos_token_id=2).eval()
    with torch.no_grad():
        model.mlm_head.bias[2] = -100.0  # never stop early
    images = torch.randn(1, 3, 32, 32)
    tokens = model.generate(images, num_beams=1, max_length=6)[0].tolist()
    words = []
    with torch.no_grad():
        for _ in range(4):
            ids = torch.tensor([[0] + words + [49]])
            words.append(int(model(images, ids).logits[0, -1].argmax()))
    assert tokens == [0] + words + [2]


def test_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 3])
    log_p = torch.log_softmax(logits, -1)
    plain = -(log_p[0, 0] + log_p[1, 3]) / 2
    torch.testing.assert_close(captioning_loss(logits, targets, 0.0), plain)
    worst_dropped = captioning_loss(logits, targets, 0.0, drop_worst_ratio=0.5)
    torch.testing.assert_close(worst_dropped, -log_p[0, 0])  # the lower of the two losses
    eps = 0.3
    t = torch.full((2, 4), eps / 3)
    t[0, 0] = t[1, 3] = 1 - eps
    kl = (t * (t.log() - log_p)).sum(-1).mean()
    torch.testing.assert_close(captioning_loss(logits, targets, eps), kl)


def test_generate_rejects_bad_arguments():
    model = Beit3ForCaptioning(TINY, mask_token_id=49)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(torch.randn(1, 3, 32, 32), max_length=2)
    with pytest.raises(ValueError, match="min_length"):
        model.generate(torch.randn(1, 3, 32, 32), max_length=5, min_length=6)
    with pytest.raises(ValueError, match="mask_token_id 50 is outside the vocabulary"):
        Beit3ForCaptioning(TINY, mask_token_id=50)


def test_a_model_of_another_vocabulary_loads_without_a_mask_id_and_generate_says_what_to_pass(tmp_path):
    """Issue 21 item 15: the 64001 default belongs to the official vocabulary only; the weights of
    any other load, and generate() asks for the tokenizer's <mask> id."""
    torch.manual_seed(0)
    Beit3ForCaptioning(TINY, mask_token_id=49).save_pretrained(tmp_path / "cap")
    # config.json without the head arguments (as a converted or hand-written folder may be)
    config = tmp_path / "cap" / "config.json"
    meta = json.loads(config.read_text())
    meta["head"] = {}
    config.write_text(json.dumps(meta))
    model = Beit3ForCaptioning.from_pretrained(tmp_path / "cap").eval()
    assert model.mask_token_id is None
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pass mask_token_id=.*--mask-token-id"):
        model.generate(images, num_beams=1, max_length=5)
    given = model.generate(images, num_beams=1, max_length=5, mask_token_id=49)
    model.mask_token_id = 49
    assert torch.equal(given, model.generate(images, num_beams=1, max_length=5))
    assert Beit3ForCaptioning(TINY.replace(vocab_size=64010)).mask_token_id == 64001  # the official vocabulary


def test_eos_is_masked_until_min_length():
    """Issue 21 item 12: a model that would stop at once ([BOS, EOS]) still says a word by default."""
    torch.manual_seed(5)
    model = Beit3ForCaptioning(TINY, mask_token_id=49).eval()
    with torch.no_grad():
        model.mlm_head.bias[2] = 100.0  # EOS always wins when allowed
    images = torch.randn(2, 3, 32, 32)
    for beams in (1, 3):
        tokens = model.generate(images, num_beams=beams, max_length=8)
        assert tokens.shape[1] == 3 and (tokens[:, 2] == 2).all() and (tokens[:, 1] != 2).all()
        assert model.generate(images, num_beams=beams, max_length=8, min_length=2).tolist() == [[0, 2]] * 2
        longer = model.generate(images, num_beams=beams, max_length=8, min_length=5)
        assert longer.shape[1] == 5 and (longer[:, 1:4] != 2).all() and (longer[:, 4] == 2).all()
