"""Every consumer of task names reads the catalogue, and no other table of task names remains."""
from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import pytest

from beit3 import pipelines
from beit3.catalogue import all_tasks, get_task, iter_tasks
from beit3.config import Beit3Config
from beit3.training.config import config_from_dict

SRC = Path(__file__).resolve().parents[1] / "src" / "beit3"
ALLOWED = {
    # dataset names (`beit3 data build vqav2 | nlvr2 | imagenet`, the synthetic world's folders)
    "data/builders/__init__.py", "data/builders/imagenet.py", "data/builders/nlvr2.py", "data/builders/vqa.py",
    "data/synthetic/world.py",
    # the demo's plan names the tasks it runs (everything else about them comes from the catalogue)
    "demo/pipeline.py", "demo/report_writer.py",
}
WORDS = {("tasks/detection.py", "segmentation"), ("data/dense.py", "segmentation"),  # COCO's annotation field
         ("serve/app.py", "nlvr2"),  # the endpoint, nlvr2's `beit3 predict` verb (which is also its name)
         # graph names of an export folder's manifest (the file names of its .onnx / .pt2 programs)
         ("export/graphs.py", "classification"), ("export/graphs.py", "nlvr2"),
         ("export/runtime.py", "classification"), ("export/runtime.py", "nlvr2")}


def test_task_names_appear_only_in_their_declaration():
    owners = {spec.name: Path(inspect.getsourcefile(spec.task_class)).resolve() for spec in all_tasks().values()}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in owners and owners[node.value] != path.resolve() \
                    and (relative, node.value) not in WORDS:
                found.append(f"{relative}:{node.lineno} {node.value!r}")
    assert not found, "task names outside their declaration: " + ", ".join(found)


def test_every_name_finds_its_task_once():
    seen = {}
    for spec in iter_tasks():
        for name in spec.names:
            assert name not in seen, f"{name} names {seen[name]} and {spec.name}"
            seen[name] = spec.name
            assert get_task(name) is spec
        assert spec.task_class.spec is spec and spec.statistics and spec.metric


def test_engine_builds_every_task_by_every_name(tmp_path):
    from beit3.training.task import TrainTask, build_task

    for spec in iter_tasks("finetune"):
        for name in (spec.name, *spec.aliases):
            cfg = config_from_dict({"task": {"name": name}, "data": {"root": str(tmp_path)}})
            task = build_task(cfg, "finetune")
            assert isinstance(task, TrainTask) and task.spec is spec


def _tiny_model(cls):
    config = Beit3Config.from_preset("tiny")
    kwargs = {"mask_token_id": config.vocab_size - 1} if "mask_token_id" in inspect.signature(cls).parameters else {}
    return cls(config, **kwargs)


def test_convert_choices_and_head_detection_come_from_the_catalogue():
    from beit3.models.commands import _convertible, detect_task
    from beit3.models.convert import to_task_form

    assert _convertible() == [spec.name for spec in iter_tasks("finetune") if spec.head_keys]
    for spec in iter_tasks("finetune", having="head_keys"):
        state, _ = to_task_form(_tiny_model(spec.model_class).state_dict())
        assert detect_task(state) == spec.name
    assert detect_task({"beit3.text_embed.weight": None}) == "backbone"


def test_pipeline_accepts_every_name_of_a_task_with_a_pipeline(monkeypatch):
    opened = []
    for spec in iter_tasks(having="pipeline"):
        cls = spec.pipeline_class()
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: opened.append(c) or c))
        for name in spec.names:
            assert pipelines.pipeline(name, "folder") is cls
        assert cls.spec() is spec
    assert opened
    with pytest.raises(ValueError, match="unknown pipeline task 'detection'"):
        pipelines.pipeline("detection", "folder")


def test_predict_verbs_are_the_catalogue_verbs():
    from beit3.tasks.predict import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    predict = parser._subparsers._group_actions[0].choices["predict"]
    verbs = set(predict._subparsers._group_actions[0].choices)
    assert verbs == {spec.verb for spec in iter_tasks("finetune", having="predict")}
    for spec in iter_tasks("finetune", having="predict"):
        args = parser.parse_args(["predict", spec.verb, "--model", "m", *(["x.png"] if spec.verb != "nlvr2" else []),
                                  *(["--question", "q"] if spec.verb == "vqa" else []),
                                  *(["--classes", "c.txt"] if spec.verb == "zero-shot" else []),
                                  *(["--out", "o"] if spec.pipeline is None else [])])
        assert get_task(args.task_name) is spec


def test_every_index_task_declares_the_baseline_the_demo_prints():
    assert all(spec.baseline is not None for spec in iter_tasks("finetune", having="index"))


def test_evaluate_splits_are_the_spec_index_files(tmp_path):
    from beit3.training.task import build_task

    for spec in iter_tasks("finetune", having="index"):
        task = build_task(config_from_dict({"task": {"name": spec.name}, "data": {"root": str(tmp_path)}}), "finetune")
        for split in spec.splits:
            assert task.split_index(split) == spec.index_file(split)
        assert task.val_index() == spec.index_file(spec.eval_split)
