import dataclasses

import pytest

from beit3 import catalogue
from beit3.catalogue import TaskSpec, register_task
from beit3.training.config import load_config
from beit3.training.task import TrainTask, build_task
from conftest import TINY
from toytask import ToyTask


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(catalogue, "_REGISTRY", {})
    monkeypatch.setattr(catalogue, "_LOADED", True)

    @register_task
    class Toy(ToyTask):
        def __init__(self, cfg):
            super().__init__(cfg.task.options)

    @register_task
    class ToyPretrain(ToyTask):
        spec = dataclasses.replace(ToyTask.spec, name="toy_pretrain", kind="pretrain", description="toy pretraining")

        def __init__(self, cfg):
            super().__init__({})


def test_registered_task_is_built_and_follows_the_protocol(registry):
    cfg = load_config(TINY, ["task.name=toy", "task.options.dim=4"])
    built = build_task(cfg, "finetune")
    assert isinstance(built, TrainTask) and built.dim == 4 and built.spec.task_class is type(built)


def test_kind_mismatch_and_unknown_names_are_explained(registry):
    with pytest.raises(ValueError, match="use 'beit3 pretrain'"):
        build_task(load_config(TINY, ["task.name=toy_pretrain"]), "finetune")
    with pytest.raises(KeyError) as err:
        build_task(load_config(TINY, ["task.name=nope"]), "finetune")
    assert err.value.args[0] == "unknown task 'nope'; registered tasks: toy"


def test_double_registration_and_taken_aliases_are_refused(registry):
    with pytest.raises(ValueError, match="already registered"):
        @register_task
        class Other(ToyTask):
            pass
    with pytest.raises(ValueError, match="already taken by task 'toy'"):
        @register_task
        class Clash(ToyTask):
            spec = dataclasses.replace(ToyTask.spec, name="clash", aliases=("toy",))
    with pytest.raises(TypeError, match="spec = TaskSpec"):
        register_task(type("NoSpec", (), {}))


def test_import_path_factory_must_return_a_task():
    with pytest.raises(TypeError, match="TrainTask protocol"):
        build_task(load_config(TINY, ["task.name=toytask:ToyConfig"]))


def test_list_tasks_needs_no_recipe(registry, capsys):
    import argparse

    from beit3.training.commands import register

    parser = argparse.ArgumentParser(prog="beit3")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--list-tasks"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == ["toy_pretrain", "toy", "pretraining"]


def test_spec_index_files_and_names():
    spec = TaskSpec(name="t", kind="finetune", aliases=("a",), verb="v", index="{prefix}.{split}.jsonl",
                    datasets={"coco": "c", "flickr30k": "f"}, train_splits=("train", "extra"))
    assert spec.names == ("t", "a", "v")
    assert spec.index_file("val") == "c.val.jsonl" and spec.index_file("test", "flickr30k") == "f.test.jsonl"
    assert spec.train_index("flickr30k") == ["f.train.jsonl", "f.extra.jsonl"]
    with pytest.raises(ValueError, match="must be one of"):
        spec.index_file("val", "nocaps")
