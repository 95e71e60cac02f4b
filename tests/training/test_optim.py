import math

import pytest
import torch
from torch import nn

from beit3.training.optim import WarmupCosineSchedule, WeightEma, param_groups, warmup_cosine_lr


class BaseLikeModel(nn.Module):
    """Official BEiT-3 names on a 12-layer skeleton (tiny tensors) with the model protocol."""

    def __init__(self, num_layers: int = 12) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"num_layers": num_layers})()
        self.text_embed = nn.Embedding(10, 4)
        self.vision_cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.vision_pos = nn.Parameter(torch.zeros(5, 4))
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(4)
        self.pooler = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"vision_pos", "vision_cls_token"}

    def layer_id(self, name: str) -> int:
        if name.startswith(("text_embed", "vision_")):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return self.config.num_layers + 1


def _by_param(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in groups for p in g["params"]}


def test_layer_decay_scales_match_official_base():
    model = BaseLikeModel()
    groups = _by_param(model, param_groups(model, weight_decay=0.05, layer_decay=0.65))
    assert groups["text_embed.weight"]["lr_scale"] == pytest.approx(0.65 ** 13)
    assert groups["vision_pos"]["lr_scale"] == pytest.approx(0.65 ** 13)
    assert groups["layers.0.weight"]["lr_scale"] == pytest.approx(0.65 ** 12)
    assert groups["layers.11.weight"]["lr_scale"] == pytest.approx(0.65)
    assert groups["final_norm.weight"]["lr_scale"] == 1.0
    assert groups["head.3.weight"]["lr_scale"] == 1.0
    assert "frozen" not in groups
    assert math.isclose(0.65 ** 13, 0.0037, rel_tol=0.02)


def test_weight_decay_rules():
    model = BaseLikeModel()
    groups = _by_param(model, param_groups(model, weight_decay=0.05))
    decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.05}
    assert decayed == {"text_embed.weight", "pooler.weight", "head.0.weight", "head.3.weight"} | {
        f"layers.{i}.weight" for i in range(12)}
    # 1-D tensors, biases and declared names get none; 3-D cls token is excluded by name only.
    for name in ("layers.3.bias", "final_norm.weight", "head.1.weight", "vision_pos", "vision_cls_token"):
        assert groups[name]["weight_decay"] == 0.0


def test_head_multiplier_applies_to_head_not_pooler():
    model = BaseLikeModel()
    groups = _by_param(model, param_groups(model, weight_decay=0.01, head_lr_scale=20.0))
    assert groups["head.0.weight"]["lr_scale"] == 20.0
    assert groups["head.3.bias"]["lr_scale"] == 20.0
    assert groups["pooler.weight"]["lr_scale"] == 1.0
    assert groups["layers.0.weight"]["lr_scale"] == 1.0


def test_groups_cover_each_trainable_parameter_once():
    model = BaseLikeModel()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.8, head_lr_scale=5.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert len({g["group_name"] for g in groups}) == len(groups)


def test_layer_id_out_of_range_is_an_error():
    model = BaseLikeModel()
    model.layer_id = lambda name: 99
    with pytest.raises(ValueError, match="outside 0..13"):
        param_groups(model, weight_decay=0.0)


def test_schedule_values_at_hand_computed_points():
    kw = dict(base_lr=1e-3, min_lr=1e-5, warmup_lr=1e-4, warmup_steps=10, total_steps=110)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-4)          # starts at warmup_lr, not 0
    assert warmup_cosine_lr(5, **kw) == pytest.approx(5.5e-4)        # halfway: (1e-4 + 1e-3) / 2
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1e-3)         # peak
    assert warmup_cosine_lr(60, **kw) == pytest.approx(5.05e-4)      # cosine midpoint: (1e-3 + 1e-5) / 2
    assert warmup_cosine_lr(35, **kw) == pytest.approx(1e-5 + 0.5 * 9.9e-4 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_lr(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine_lr(500, **kw) == pytest.approx(1e-5)
    no_warmup = dict(kw, warmup_steps=0)
    assert warmup_cosine_lr(0, **no_warmup) == pytest.approx(1e-3)


def test_schedule_sets_scaled_group_lrs_and_resumes():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.5}], lr=1.0)
    sched = WarmupCosineSchedule(opt, base_lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_steps=4, total_steps=8)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    for _ in range(2):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])
    again = WarmupCosineSchedule(opt, base_lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_steps=4, total_steps=8)
    again.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])


def test_ema_update_and_swap():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEma(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 2.0))  # 0.75 * 1 + 0.25 * 5
    ema.swap(model)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.0))
    ema.swap(model)
    assert torch.allclose(model.weight, torch.full((1, 2), 5.0))
