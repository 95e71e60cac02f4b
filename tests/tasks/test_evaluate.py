"""`beit3 evaluate` on a tiny classifier: what it scores, what it prints and where it fails (issue 21)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import Beit3ForImageClassification
from beit3.pipelines import pipeline
from tests.faults import assert_one_line_error, read_only_dir, run_cli
from tests.tiny_pipelines import save_model_folder, tiny_tokenizer, write_images

CLASSES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Five images, a classification index over them (labels 0..2) and a tiny classifier at 32 px."""
    root = tmp_path_factory.mktemp("evaluate")
    paths = write_images(root / "index" / "images", 5)
    rows = [{"image_path": f"images/{p.name}", "label": i % CLASSES} for i, p in enumerate(paths)]
    (root / "index" / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    Beit3ForImageClassification(Beit3Config.from_preset("tiny"), num_labels=CLASSES).save_pretrained(root / "ckpt")
    assert Beit3Config.from_preset("tiny").image_size == 32
    return root


def evaluate(world: Path, *extra: str, index: str = "cls.jsonl", checkpoint: Path | None = None):
    return run_cli(["evaluate", "--task", "classification", "--checkpoint", checkpoint or world / "ckpt",
                    "--index", index, "--batch-size", "2", *extra, f"data.root={world / 'index'}",
                    f"task.options.num_classes={CLASSES}"])


def expected_acc1(world: Path, rows: list[dict]) -> float:
    """Top-1 of the classification pipeline, which preprocesses at the model's own size."""
    classify = pipeline("classification", world / "ckpt", device="cpu")
    ranked = classify([world / "index" / r["image_path"] for r in rows], top_k=1)
    return 100 * sum(top[0]["label"] == str(r["label"]) for top, r in zip(ranked, rows)) / len(rows)


def rows_of(world: Path, name: str = "cls.jsonl") -> list[dict]:
    return [json.loads(line) for line in (world / "index" / name).read_text().splitlines()]


def test_images_at_the_checkpoint_size_counts_as_ints_and_progress(world, tmp_path, monkeypatch):
    """Items 7, 18, 19: no recipe -> 32 px (the model's), not 224; `samples 5`, not 5.0; progress on stderr."""
    import beit3.tasks.commands as commands

    monkeypatch.setattr(commands, "PROGRESS_SECONDS", 0.0, raising=False)
    out = tmp_path / "result.json"
    code, stdout, stderr = evaluate(world, "--output", out)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["image_size"] == 32
    assert result["metrics"]["samples"] == 5 and isinstance(result["metrics"]["samples"], int)
    assert result["metrics"]["acc1"] == pytest.approx(expected_acc1(world, rows_of(world)))
    (line,) = [line for line in stdout.splitlines() if line.startswith("samples")]
    assert line.split() == ["samples", "5"]
    progress = [line for line in stderr.splitlines() if line.startswith("evaluate: ")]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"]

    # a recipe (here an override) that sets another size wins, and says so
    code, _, stderr = evaluate(world, "--output", out, "model.image_size=48")
    assert code == 0, stderr
    assert "evaluating at 48 px" in stderr and "trained at 32 px" in stderr
    assert json.loads(out.read_text())["image_size"] == 48


def test_unreadable_images_are_skipped_and_counted_not_replaced(world, tmp_path):
    """Item 10: a missing and a corrupt image are not scored (no other sample in their place)."""
    rows = rows_of(world)
    (world / "index" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = rows[:2] + [{"image_path": "images/gone.png", "label": 0}] + rows[2:4] + \
        [{"image_path": "images/broken.png", "label": 1}] + rows[4:]
    (world / "index" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "bad.json"
    code, stdout, stderr = evaluate(world, "--output", out, index="bad.jsonl")
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["metrics"]["samples"] == 5 and result["metrics"]["skipped"] == 2
    assert result["metrics"]["acc1"] == pytest.approx(expected_acc1(world, rows))
    assert [item["row"] for item in result["skipped"]] == [2, 5]
    assert "gone.png" in result["skipped"][0]["reason"] and "broken.png" in result["skipped"][1]["reason"]
    assert "skipped 2 of 7 samples whose image could not be read" in stderr
    assert "gone.png" in stderr and "broken.png" in stderr
    assert "skipped" in stdout  # in the table too


def test_a_label_outside_num_classes_names_the_index_line(world):
    """Item 17: a label the head cannot score is refused when the dataset is built."""
    rows = rows_of(world)
    rows[3]["label"] = 7
    (world / "index" / "wrong_label.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, stdout, stderr = evaluate(world, index="wrong_label.jsonl")
    assert_one_line_error(code, stderr, "wrong_label.jsonl:4", "label 7", "0..2")
    assert stdout == ""


def test_another_tasks_model_is_named_with_the_task_it_serves(world, tmp_path):
    """Item 14: not an option error or a key diff suggesting --init-head."""
    folder = save_model_folder("vqa", tiny_tokenizer(tmp_path / "tok"), tmp_path / "vqa")
    code, _, stderr = evaluate(world, checkpoint=folder)
    assert_one_line_error(code, stderr, f"model in {folder} is a vqav2 model (Beit3ForVisualQuestionAnswering)",
                          "task classification needs Beit3ForImageClassification", "--task vqav2")


def test_output_in_a_read_only_folder_fails_before_any_work(world, tmp_path, monkeypatch):
    """Item 2: one line at the start, not a traceback after the evaluation."""
    import beit3.tasks.commands as commands

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(commands, "load_checkpoint", no_work)
    with read_only_dir(tmp_path) as folder:
        code, stdout, stderr = evaluate(world, "--output", folder / "result.json")
    assert_one_line_error(code, stderr, str(folder))
    assert stdout == ""


def test_read_only_checkpoint_folder_prints_the_metrics_then_fails_in_one_line(world, tmp_path):
    """Item 2: the table is on stdout before the JSON write fails."""
    with read_only_dir(tmp_path, "read-only-checkpoint", source=world / "ckpt") as checkpoint:
        code, stdout, stderr = evaluate(world, checkpoint=checkpoint)
    assert_one_line_error(code, stderr, str(checkpoint / "eval_classification_index.json"), "metrics are printed above")
    assert "acc1" in stdout and stdout.split("samples")[1].split() == ["5"]
