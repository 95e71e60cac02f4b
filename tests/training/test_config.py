from pathlib import Path

import pytest

from beit3.training.config import RunConfig, apply_overrides, config_from_dict, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_override_values_are_typed_by_yaml():
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], "1e-4")
    assert parse_override("optim.clip_grad=null") == (["optim", "clip_grad"], None)
    assert parse_override("train.progress_bar=false") == (["train", "progress_bar"], False)
    assert parse_override("optim.betas=[0.9, 0.98]") == (["optim", "betas"], [0.9, 0.98])


def test_overrides_apply_in_order_and_coerce_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {name: vqav2}\noptim: {lr: 3e-5, betas: [0.9, 0.98]}\n")
    cfg = load_config(recipe, ["optim.lr=1e-3", "optim.lr=2e-3", "task.options.label_smoothing=0.1",
                               "parallel.block_lists=[beit3.encoder.layers]"])
    assert cfg.optim.lr == 2e-3
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.task.options == {"label_smoothing": 0.1}
    assert cfg.parallel.block_lists == ["beit3.encoder.layers"]
    assert cfg.optim.min_lr == RunConfig().optim.min_lr


def test_yaml_scientific_notation_string_is_a_float():
    # PyYAML reads "3e-5" as a string; float fields accept it.
    cfg = config_from_dict({"task": {"name": "x"}, "optim": {"lr": "3e-5"}})
    assert cfg.optim.lr == pytest.approx(3e-5)


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "optimizer"),
    ("train.outptu_dir=x", "train.outptu_dir"),
])
def test_unknown_key_error_names_the_key(override, named):
    with pytest.raises(KeyError, match=named):
        config_from_dict(apply_overrides({"task": {"name": "x"}}, [override]))


def test_unknown_key_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'optim.lr'"):
        config_from_dict({"task": {"name": "x"}, "optim": {"lrr": 1.0}})


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=8.5", "data.batch_size: expected an integer"),
    ("train.precision=fp8", "train.precision"),
    ("train.progress_bar=yes please", "train.progress_bar: expected true/false"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ("optim.layer_decay=1.5", "layer_decay"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(apply_overrides({"task": {"name": "x"}}, [override]))


def test_malformed_override():
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("lr")
    with pytest.raises(ValueError, match="must name a section"):
        parse_override("lr=1")


def test_fp16_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="bf16"):
        config_from_dict({"task": {"name": "x"}, "train": {"precision": "fp16"}, "parallel": {"strategy": "fsdp"}})


def test_yaml_round_trip():
    cfg = load_config(CONFIGS / "vqav2_base_480.yaml")
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


RECIPES = sorted(CONFIGS.glob("*.yaml"))
OFFICIAL_ROWS = {
    "imagenet_base_224", "imagenet_large_224", "vqav2_base_480", "vqav2_large_480",
    "nlvr2_base_224", "nlvr2_base_indomain_224", "nlvr2_large_224", "nlvr2_large_indomain_224",
    "coco_retrieval_base_384", "flickr30k_retrieval_base_384",
    "coco_retrieval_large_384", "flickr30k_retrieval_large_384",
    "coco_captioning_base_480", "nocaps_captioning_base_480",
    "coco_captioning_large_480", "nocaps_captioning_large_480",
}


def test_every_official_row_has_a_recipe():
    assert OFFICIAL_ROWS <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_names_a_registered_task(recipe):
    from beit3.catalogue import get_task

    cfg = load_config(recipe)
    assert get_task(cfg.task.name).name == cfg.task.name  # recipes use canonical names


@pytest.mark.parametrize("recipe", sorted(p for p in RECIPES if p.stem in OFFICIAL_ROWS), ids=sorted(OFFICIAL_ROWS))
def test_official_recipes_keep_the_official_settings(recipe):
    cfg = load_config(recipe)
    assert cfg.train.seed == 42
    assert cfg.optim.min_lr == pytest.approx(1e-6)
    # Warmup really starts at the configured start LR (0 here, as the official runs effectively did).
    assert cfg.optim.warmup_lr == 0.0


def test_recipe_values_match_the_official_table():
    vqa = load_config(CONFIGS / "vqav2_base_480.yaml")
    assert (vqa.data.batch_size, vqa.optim.lr, vqa.optim.layer_decay, vqa.optim.head_lr_scale) == (128, 3e-5, 1.0, 20.0)
    assert vqa.optim.betas == (0.9, 0.98) and vqa.model.image_size == 480
    assert (vqa.schedule.epochs, vqa.schedule.warmup_epochs, vqa.model.drop_path_rate) == (10, 1.0, 0.1)
    inet = load_config(CONFIGS / "imagenet_large_224.yaml")
    assert (inet.data.batch_size, inet.optim.lr, inet.optim.layer_decay, inet.model.drop_path_rate) == (1024, 2e-4, 0.8, 0.25)
    ret = load_config(CONFIGS / "coco_retrieval_large_384.yaml")
    assert (ret.data.batch_size, ret.optim.lr, ret.schedule.epochs, ret.schedule.warmup_epochs) == (3072, 5e-5, 15, 3.0)


def test_a_recipe_with_a_yaml_error_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  preset: tiny\noptim:\n  lr: [1e-4\n")
    with pytest.raises(ValueError) as err:
        load_config(recipe)
    message = str(err.value)
    assert str(recipe) in message and "not valid YAML" in message and "line " in message
    assert len(message.splitlines()) == 1
    recipe.write_text("- a list\n")
    with pytest.raises(ValueError, match="must be a mapping of sections"):
        load_config(recipe)


def test_an_override_with_a_yaml_error_names_the_override():
    with pytest.raises(ValueError, match=r"override 'optim.lr=\[1': the value is not valid YAML"):
        load_config(None, ["optim.lr=[1"])
