"""`beit3 finetune` runs a couple of steps of every task on the synthetic world (tiny recipes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from beit3.catalogue import all_tasks, get_task
from beit3.cli import main

from .conftest import VAL_INDEX

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METRIC = {"imagenet": "acc1", "vqav2": "vqa_score", "nlvr2": "accuracy", "retrieval": "average_score",
          "captioning": "cider"}


def test_every_task_is_registered_under_the_recipe_names():
    names = {name for spec in all_tasks("finetune").values() for name in spec.names}
    assert set(METRIC) <= names
    for recipe in CONFIGS.glob("*.yaml"):
        text = recipe.read_text()
        if "\ntask:\n  name:" in text and "pretrain" not in recipe.name:
            name = text.split("\ntask:\n  name:")[1].split()[0]
            assert name in names, f"{recipe.name} names task {name!r}"


@pytest.mark.parametrize("task", sorted(METRIC))
def test_finetune_two_steps_from_a_pretrained_folder(task, world, pretrained_dir, tmp_path):
    out = tmp_path / "run"
    status = main([
        "finetune", "--recipe", str(CONFIGS / f"tiny_{task}.yaml"),
        f"data.root={world / 'index'}", f"model.pretrained={pretrained_dir}", f"train.output_dir={out}",
        "schedule.max_steps=2", "schedule.warmup_steps=1", "data.batch_size=4", "data.eval_batch_size=6",
        f"task.options.val_index=small.{VAL_INDEX[task]}", "task.options.tokenizer=null",
    ] + (["task.options.num_beams=1", "task.options.max_decode_len=6"] if task == "captioning" else []))
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in val if row.get("split") == "val"]
    assert val and METRIC[task] in val[-1]
    assert (out / "final" / "model.safetensors").is_file()

    # `beit3 evaluate` on the final weights gives the metric the last validation logged
    status = main(["evaluate", "--task", task, "--checkpoint", str(out / "final"), "--index",
                   f"small.{VAL_INDEX[task]}", "--batch-size", "4"])
    assert status == 0
    result = json.loads((out / "final" / "eval_{}_index.json".format(get_task(task).name)).read_text())
    assert result["metrics"][METRIC[task]] == pytest.approx(val[-1][METRIC[task]], abs=1e-4)
    if task == "vqav2":  # the official accuracy beside the soft score, from the index's raw answers
        assert {"vqa_accuracy", "vqa_accuracy_yes_no", "vqa_accuracy_number"} <= set(result["metrics"])
        assert main(["evaluate", "--task", task, "--checkpoint", str(out / "final"), "--split", "test-dev"]) == 0
        submission = json.loads((out / "final" / "submit_vqav2_test-dev.json").read_text())
        test_dev = (world / "index" / "vqa.test-dev.jsonl").read_text().splitlines()
        assert len(submission) == len(test_dev) and set(submission[0]) == {"question_id", "answer"}


def test_nlvr2_head_init_scale_comes_from_the_recipe():
    """The release shrinks the NLVR2 head by 0.001; the tiny recipe keeps it at full scale."""
    from beit3.tasks.nlvr2 import NLVR2Task
    from beit3.training.config import load_config

    def head_std(overrides: list[str]) -> float:
        cfg = load_config(CONFIGS / "tiny_nlvr2.yaml", overrides + ["task.options.tokenizer=null"])
        model = NLVR2Task(cfg).build_model(cfg)
        return model.head.dense1.weight.std().item()

    full, official = head_std([]), head_std(["task.options.head_init_scale=0.001"])
    assert full == pytest.approx(0.07 * 0.88, rel=0.1)  # a 2-sigma truncated normal of std 0.07
    assert official == pytest.approx(full * 0.001, rel=0.1)
