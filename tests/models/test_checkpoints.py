"""from_pretrained / save_pretrained: our format, official files, and loud failures (timm files:
test_timm_weights.py; Hugging Face folders: test_hf_layout.py)."""
import json

import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForVisualQuestionAnswering,
    Beit3Model,
    CheckpointError,
    load_any_model,
)
from beit3.models.convert import read_state_dict, to_task_form
from tests.faults import assert_one_line_error, read_only_dir, run_cli
from tests.models.reference import official_names

TINY = Beit3Config.from_preset("tiny")


def test_save_and_load_round_trip(tmp_path):
    model = Beit3ForVisualQuestionAnswering(TINY, num_labels=13).eval()
    model.save_pretrained(tmp_path / "vqa")
    assert sorted(p.name for p in (tmp_path / "vqa").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "vqa" / "config.json").read_text())
    assert meta["architecture"] == "Beit3ForVisualQuestionAnswering" and meta["head"] == {"num_labels": 13}
    loaded = load_any_model(tmp_path / "vqa").eval()
    assert isinstance(loaded, Beit3ForVisualQuestionAnswering) and loaded.config == TINY
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids).logits, model(images, ids).logits, rtol=0, atol=0)


def test_config_json_round_trip_and_unknown_keys():
    for name in ("tiny", "base", "large", "giant"):
        config = Beit3Config.from_preset(name)
        assert Beit3Config.from_json_string(config.to_json_string()) == config
    with pytest.raises(ValueError, match="num_layer"):
        Beit3Config.from_dict({"num_layer": 6})
    with pytest.raises(ValueError, match="attention"):
        Beit3Config.from_preset("tiny", attention="sparse")
    with pytest.raises(ValueError, match="divisible"):
        Beit3Config.from_preset("tiny", num_heads=5)


def test_missing_head_is_an_error_unless_asked_to_init(tmp_path):
    Beit3Model(TINY).save_pretrained(tmp_path / "backbone")
    with pytest.raises(CheckpointError) as err:
        Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "backbone")
    assert "missing keys" in str(err.value) and "pooler.dense.weight" in str(err.value)
    assert "init_head=True" in str(err.value)
    model = Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "backbone", init_head=True, num_labels=5)
    backbone = Beit3Model.from_pretrained(tmp_path / "backbone")
    torch.testing.assert_close(model.beit3.layers[0].ffn["text"].fc1.weight, backbone.layers[0].ffn["text"].fc1.weight)


def _saved_with_head_filled(model, head, folder):
    """Save ``model`` with every weight of its ``head`` set to 0.5, far above any fresh init."""
    with torch.no_grad():
        getattr(model, head).weight.fill_(0.5)
    model.save_pretrained(folder)
    return folder


def test_init_head_starts_a_fresh_head_even_when_the_checkpoint_has_one_of_that_shape(tmp_path):
    """A pretraining checkpoint's mlm_head has the captioning head's name and shape, and a
    classifier's head fits another classifier of as many classes: init_head=True still starts
    them fresh (it used to load them silently)."""
    from beit3.models import Beit3ForPreTraining

    pretraining = Beit3ForPreTraining(TINY, visual_vocab_size=32)
    folder = _saved_with_head_filled(pretraining, "mlm_head", tmp_path / "pretraining")
    captioner = Beit3ForCaptioning.from_pretrained(folder, init_head=True, mask_token_id=3)
    assert captioner.mlm_head.weight.abs().max() < 0.5
    torch.testing.assert_close(captioner.beit3.layers[0].ffn["text"].fc1.weight,
                               pretraining.beit3.layers[0].ffn["text"].fc1.weight)

    classifier = Beit3ForImageClassification(TINY, num_labels=3)
    folder = _saved_with_head_filled(classifier, "head", tmp_path / "classifier")
    fresh = Beit3ForImageClassification.from_pretrained(folder, init_head=True, num_labels=3)
    assert fresh.head.weight.abs().max() < 0.5
    kept = Beit3ForImageClassification.from_pretrained(folder)
    assert torch.equal(kept.head.weight, classifier.head.weight)


def test_pretrained_final_norm_dropped_for_tasks_without_it(tmp_path):
    """Fine-tuning ImageNet/VQA from a pretrained backbone drops its final LayerNorm, as the release."""
    Beit3Model(TINY).save_pretrained(tmp_path / "pretrained")
    model = Beit3ForImageClassification.from_pretrained(tmp_path / "pretrained", init_head=True, num_labels=3)
    assert model.beit3.norm is None


def test_mis_shaped_and_unexpected_keys_are_listed(tmp_path):
    model = Beit3ForImageClassification(TINY, num_labels=4)
    state = model.state_dict()
    state["beit3.layers.1.ffn.vision.fc1.weight"] = torch.zeros(3, 3)
    state["beit3.something_else"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        Beit3ForImageClassification.from_pretrained(tmp_path / "bad.pth")
    text = str(err.value)
    assert "beit3.layers.1.ffn.vision.fc1.weight checkpoint (3, 3) vs model (256, 64)" in text
    assert "unexpected keys (1): beit3.something_else" in text


def test_final_norm_mismatch_is_not_silent(tmp_path):
    """Loading a checkpoint without the final LayerNorm into a model that has one (gotcha #2)."""
    Beit3ForImageClassification(TINY.replace(final_norm=False)).save_pretrained(tmp_path / "cls")
    with pytest.raises(CheckpointError, match="missing keys.*beit3.norm"):
        Beit3ForImageClassification.from_pretrained(tmp_path / "cls", final_norm=True)


def test_official_pth_with_module_key_and_pickles_are_weights_only(tmp_path):
    state = {f"beit3.{k}": v for k, v in official_names(Beit3Model(TINY)).items()}
    torch.save({"module": state}, tmp_path / "deepspeed.pth")
    model = Beit3Model.from_pretrained(tmp_path / "deepspeed.pth", num_heads=4)
    assert model.config.num_layers == 2

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model": state, "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Beit3Model.from_pretrained(tmp_path / "evil.pth")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Beit3Model.from_pretrained(tmp_path / "nope.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Beit3Model.from_pretrained(tmp_path / "empty_dir")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.pth"):
        Beit3Model.from_pretrained(tmp_path / "junk.pth")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        Beit3Model.from_pretrained(tmp_path / "other.pth")


def test_save_is_atomic_and_keeps_the_previous_files_on_failure(tmp_path, monkeypatch):
    model = Beit3Model(TINY)
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        Beit3Model(TINY).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_convert_command_detects_the_task(tmp_path, capsys):
    from beit3.cli import main

    model = Beit3ForCaptioning(TINY, mask_token_id=999)
    state = {f"beit3.{k}": v for k, v in official_names(model.beit3).items()}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("mlm_head")})
    torch.save({"model": state}, tmp_path / "cap.pth")
    assert main(["convert", str(tmp_path / "cap.pth"), str(tmp_path / "out"), "--num-heads", "4",
                 "--mask-token-id", "999"]) == 0
    assert "Beit3ForCaptioning" in capsys.readouterr().out
    assert isinstance(load_any_model(tmp_path / "out"), Beit3ForCaptioning)
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 1


def test_read_state_dict_safetensors(tmp_path):
    Beit3Model(TINY).save_pretrained(tmp_path / "m")
    state, layout = to_task_form(read_state_dict(tmp_path / "m" / "model.safetensors"))
    assert layout == "beit3" and "beit3.layers.0.attn.qkv.vision.weight" in state


def _official_captioner_file(tmp_path, **head_args):
    model = Beit3ForCaptioning(TINY, **head_args)
    state = {f"beit3.{k}": v for k, v in official_names(model.beit3).items()}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("mlm_head")})
    torch.save({"model": state}, tmp_path / "cap.pth")
    return tmp_path / "cap.pth"


def test_convert_of_a_small_vocabulary_captioner_hints_at_the_mask_token_id(tmp_path):
    path = _official_captioner_file(tmp_path)
    code, out, err = run_cli(["convert", path, tmp_path / "out", "--num-heads", "4"])
    assert code == 0, err
    assert "vocabulary has 1000 rows" in err and "--mask-token-id" in err
    assert load_any_model(tmp_path / "out").mask_token_id is None
    code, out, err = run_cli(["convert", path, tmp_path / "out2", "--num-heads", "4", "--mask-token-id", "7"])
    assert code == 0 and "--mask-token-id" not in err, err
    assert load_any_model(tmp_path / "out2").mask_token_id == 7


def test_convert_of_files_that_are_no_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "notes.pth").write_text("these are my notes, not weights\n")
    torch.save({"model": Beit3Model(TINY).state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    cases = {"notes.pth": "not a PyTorch or safetensors checkpoint", "cut.pth": "damaged or truncated",
             "cut.safetensors": "damaged or truncated safetensors"}
    for name, reason in cases.items():
        code, _, err = run_cli(["convert", tmp_path / name, tmp_path / "out"])
        assert_one_line_error(code, err, tmp_path / name, reason)
        assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model": {}, "extra": Evil()}, tmp_path / "evil.pth")
    code, _, err = run_cli(["convert", tmp_path / "evil.pth", tmp_path / "out"])
    assert_one_line_error(code, err, tmp_path / "evil.pth", "weights_only=True")
    assert "weights_only=False" not in err and "code ran" not in err


def test_convert_checks_the_output_folder_first(tmp_path):
    path = _official_captioner_file(tmp_path, mask_token_id=3)
    with read_only_dir(tmp_path) as folder:
        code, out, err = run_cli(["convert", path, folder / "model", "--num-heads", "4"])
        assert_one_line_error(code, err, folder / "model")
        assert out == ""  # nothing was converted
    (tmp_path / "taken").write_text("a file")
    code, _, err = run_cli(["convert", path, tmp_path / "taken", "--num-heads", "4"])
    assert_one_line_error(code, err, tmp_path / "taken", "not a folder")


def test_a_position_table_of_no_known_shape_is_a_checkpoint_error():
    from beit3.models.convert import infer_config

    state = {f"beit3.{k}": v for k, v in Beit3Model(TINY).state_dict().items()}
    state["beit3.vision_pos_embed"] = torch.zeros(17, 64)  # timm's N + 1 rows, in our layout
    with pytest.raises(CheckpointError, match="17 rows"):
        infer_config(state)
