"""timm's ``beit3_*`` VisionTransformers, both ways: timm weights -> our models with timm's logits,
and our models -> a file that ``timm.create_model(..., pretrained=True)`` loads with equal logits.

Every timm model here is built by timm itself (``pretrained=False``, no download) and then gets
random values in every tensor (LayerNorms included), so that a swapped or dropped tensor shows.
Our models' own initialisation is skipped (``fast_init``): every tensor that matters is loaded
from the file, and initialising the unused text side of a full-depth base model takes longer
than the whole test on a loaded CI machine.
"""
import pytest
import torch

from beit3.models import Beit3ForImageClassification, Beit3Model, load_any_model
from beit3.models.timm_format import save_timm_checkpoint, timm_model_args
from tests.faults import assert_one_line_error, run_cli

timm = pytest.importorskip("timm")


@pytest.fixture
def fast_init(monkeypatch):
    """No random initialisation in this test (ours, PyTorch's layer defaults, timm's): every tensor
    compared is set by `randomised` or loaded from a file."""
    import beit3.models.base as base

    monkeypatch.setattr(base, "init_module", lambda module, std=0.02: None)
    monkeypatch.setattr(base, "trunc_normal_init", lambda tensor, std=0.02: None)
    for layer in (torch.nn.Linear, torch.nn.Embedding):
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)


def randomised(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            centre = 1.0 if name.endswith("weight") and param.dim() == 1 else 0.0  # LayerNorm gains near 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05 + centre)
    return model.eval()


def save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def timm_from_file(path, name, kwargs):
    """timm's own loader, as a user calls it."""
    overlay = dict(file=str(path), num_classes=kwargs.get("num_classes", 1000))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def assert_logits_close(actual, expected):
    assert expected.abs().max() > 0.1  # a meaningful comparison, not of two near-zero outputs
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_timm_base_to_ours_and_back(tmp_path, fast_init):
    """timm's beit3_base_patch16_224 at full depth and width (64 px keeps the forwards short), from
    a .pth and a .safetensors file, and back (the .pth export: the giant and command tests)."""
    from beit3.models.convert import read_state_dict, to_task_form

    source = randomised(timm.create_model("beit3_base_patch16_224", pretrained=False, img_size=64, weight_init="skip"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(images)
    # Each full-size file (~350 MB) is deleted once read: at most one is on disk at a time.
    pth = save(source.state_dict(), tmp_path / "timm.pth")
    ours = Beit3ForImageClassification.from_pretrained(pth, vocab_size=100).eval()  # no text side: any vocabulary
    config = ours.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.image_size) == (12, 768, 12, 64)
    assert not config.final_norm and ours.num_labels == 1000
    with torch.no_grad():
        assert_logits_close(ours(images).logits, expected)
    # The same tensors from timm's model.safetensors (what the Hub holds).
    from_pth, layout = to_task_form(read_state_dict(pth))
    pth.unlink()
    safetensors = save(source.state_dict(), tmp_path / "model.safetensors")
    from_safetensors, _ = to_task_form(read_state_dict(safetensors))
    safetensors.unlink()
    assert layout == "timm" and from_pth.keys() == from_safetensors.keys()
    assert all(torch.equal(from_pth[k], from_safetensors[k]) for k in from_pth)
    del from_pth, from_safetensors

    name, kwargs = save_timm_checkpoint(ours, tmp_path / "back.safetensors")
    assert (name, kwargs) == ("beit3_base_patch16_224", {"img_size": 64})
    reloaded = timm_from_file(tmp_path / "back.safetensors", name, {**kwargs, "weight_init": "skip"})
    (tmp_path / "back.safetensors").unlink()
    assert reloaded.state_dict().keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        assert_logits_close(reloaded(images), expected)


def test_timm_giant_width_to_ours_and_back(tmp_path, fast_init):
    """The giant width (1408, patch 14, FFN 6144, 16 heads of 88: not width / 64) at depth 2."""
    source = randomised(timm.create_model("beit3_giant_patch14_224", pretrained=False, depth=2, img_size=56,
                                          num_classes=7, weight_init="skip"))
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(images)
    # The text side is absent from timm files; a small vocabulary keeps its fresh tensors small.
    giant = save(source.state_dict(), tmp_path / "giant.safetensors")
    ours = Beit3ForImageClassification.from_pretrained(giant, vocab_size=100).eval()
    giant.unlink()  # ~200 MB: one such file on disk at a time
    config = ours.config
    assert (config.hidden_size, config.num_heads, config.patch_size, config.intermediate_size) == (1408, 16, 14, 6144)
    with torch.no_grad():
        assert_logits_close(ours(images).logits, expected)

    name, kwargs = save_timm_checkpoint(ours, tmp_path / "back.pth")
    assert name == "beit3_giant_patch14_224" and kwargs == {"depth": 2, "img_size": 56, "num_classes": 7}
    reloaded = timm_from_file(tmp_path / "back.pth", name, {**kwargs, "weight_init": "skip"})
    with torch.no_grad():
        assert_logits_close(reloaded(images), expected)


def test_headless_timm_backbone_gives_timm_features(tmp_path, fast_init):
    """num_classes=0 (timm's `.pt` tags): a Beit3Model whose forward_features are timm's; exported
    back without fc_norm and head, timm builds it with final_norm=False."""
    source = randomised(timm.create_model("beit3_base_patch16_224", pretrained=False, embed_dim=64, depth=2,
                                          num_heads=4, patch_size=8, img_size=32, num_classes=0))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = save(source.state_dict(), tmp_path / "headless.pth")
    backbone = Beit3Model.from_pretrained(path, num_heads=4, vocab_size=100).eval()
    assert backbone.norm is None
    with torch.no_grad():
        expected = source.forward_features(images)
        assert_logits_close(backbone.forward_features(images), expected)
    name, kwargs = save_timm_checkpoint(backbone, tmp_path / "back.safetensors")
    assert kwargs["num_classes"] == 0 and kwargs["final_norm"] is False
    assert timm_model_args(backbone.config, None) == (name, kwargs)
    with torch.no_grad():
        assert_logits_close(timm_from_file(tmp_path / "back.safetensors", name, kwargs).forward_features(images),
                            expected)


def test_convert_command_both_ways_with_a_note_about_the_text_side(tmp_path):
    source = randomised(timm.create_model("beit3_base_patch16_224", pretrained=False, embed_dim=64, depth=2,
                                          num_heads=4, patch_size=8, img_size=32, num_classes=5))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = source(images)
    save(source.state_dict(), tmp_path / "model.safetensors")

    code, out, err = run_cli(["convert", tmp_path / "model.safetensors", tmp_path / "ours", "--num-heads", "4"])
    assert code == 0, err
    assert "(timm layout)" in out and "Beit3ForImageClassification" in out
    assert "note:" in err and "vision side only" in err and "text" in err  # the text side keeps its init
    ours = load_any_model(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(ours(images).logits, expected)

    code, out, err = run_cli(["convert", tmp_path / "ours", tmp_path / "timm.pth", "--to", "timm"])
    assert code == 0, err
    assert "timm.create_model('beit3_base_patch16_224', pretrained=True" in out and "num_classes=5" in out
    name, kwargs = timm_model_args(ours.config, 5)
    assert kwargs == {"embed_dim": 64, "patch_size": 8, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0,
                      "img_size": 32, "num_classes": 5}
    with torch.no_grad():
        assert_logits_close(timm_from_file(tmp_path / "timm.pth", name, kwargs)(images), expected)


def test_only_classifiers_and_backbones_go_to_timm(tmp_path):
    from beit3.config import Beit3Config
    from beit3.models import Beit3ForVisualQuestionAnswering

    Beit3ForVisualQuestionAnswering(Beit3Config.from_preset("tiny"), num_labels=3).save_pretrained(tmp_path / "vqa")
    code, _, err = run_cli(["convert", tmp_path / "vqa", tmp_path / "vqa.safetensors", "--to", "timm"])
    assert_one_line_error(code, err, "Beit3ForVisualQuestionAnswering", "--task backbone")
    assert not (tmp_path / "vqa.safetensors").exists()
    code, _, err = run_cli(["convert", tmp_path / "vqa", tmp_path / "vqa.safetensors", "--to", "timm",
                            "--task", "backbone"])
    assert code == 0, err
