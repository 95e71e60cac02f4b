import pytest

from beit3.training import task as task_module
from beit3.training.config import load_config
from beit3.training.task import TrainTask, build_task, register_task
from conftest import TINY
from toytask import ToyTask


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(task_module, "_REGISTRY", {})
    register_task("toy", "finetune", lambda cfg: ToyTask(cfg.task.options), "toy regression")
    register_task("toy_pretrain", "pretrain", lambda cfg: ToyTask({}), "toy pretraining")


def test_registered_task_is_built_and_follows_the_protocol(registry):
    cfg = load_config(TINY, ["task.name=toy", "task.options.dim=4"])
    built = build_task(cfg, "finetune")
    assert isinstance(built, TrainTask) and built.dim == 4


def test_kind_mismatch_and_unknown_names_are_explained(registry):
    with pytest.raises(ValueError, match="use 'beit3 pretrain'"):
        build_task(load_config(TINY, ["task.name=toy_pretrain"]), "finetune")
    with pytest.raises(KeyError) as err:
        build_task(load_config(TINY, ["task.name=nope"]), "finetune")
    assert err.value.args[0] == "unknown task 'nope'; registered tasks: toy"


def test_double_registration_is_refused(registry):
    with pytest.raises(ValueError, match="already registered"):
        register_task("toy", "finetune", lambda cfg: None)


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
