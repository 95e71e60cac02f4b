"""VQAv2 evaluation: the official VQA accuracy next to the soft score, per answer type, over ranks."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from beit3.data import read_jsonl
from beit3.data.builders import read_answer2label
from beit3.data.vqa_answers import answer_targets
from beit3.tasks.metrics import vqa_accuracy
from beit3.tasks.vqav2 import VQATask
from beit3.training.evaluation import evaluate_batches
from beit3.training.config import config_from_dict
from beit3.training.distributed import EvalDataset, EvalSampler
from tests.tiny_pipelines import free_port

ROWS = 7  # odd, so two processes get a padded shard


def make_task(index_root: Path, tokenizer: Path, val_index: str) -> VQATask:
    return VQATask(config_from_dict({
        "task": {"name": "vqav2", "options": {"tokenizer": str(tokenizer), "randaug": False, "max_text_len": 32,
                                              "val_index": val_index}},
        "model": {"preset": "tiny", "image_size": 32, "drop_path_rate": 0.0},
        "data": {"root": str(index_root)},
    }))


def run_evaluate(task: VQATask, rank: int = 0, world: int = 1) -> tuple[dict[str, float], dict[int, str]]:
    """The task's metrics and its predictions by question id, on the engine's evaluation shards."""
    torch.manual_seed(0)
    model = task.build_model(task.cfg).eval()
    with torch.no_grad():  # a random head is never right: make it answer "yes" so accuracies are not all 0
        model.head[-1].bias[task.answers.index("yes")] = 1e3
    _, val = task.build_datasets(task.cfg)

    def batches():
        loader = DataLoader(EvalDataset(val), batch_size=3, sampler=EvalSampler(len(val), rank, world))
        return iter(loader)

    with torch.no_grad():
        metrics, stats = evaluate_batches(task, model, batches(), torch.device("cpu"))
    return metrics, {qid: task.answers[label] for qid, label in stats["predictions"]}


def write_index(world: Path, name: str, rows: list[dict]) -> str:
    """An index beside the world's own (so the relative image paths resolve), by absolute path."""
    path = world / "vqa_eval" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def val_index(world: Path) -> str:
    """Val rows of every answer type, among them yes/no questions fewer than four annotators
    answered "yes" as typed and others "Yes" or "yes.", with the soft targets a ``--legacy`` build
    writes (raw answers matched as typed).

    On a default index the soft score equals the official accuracy (0.3 per annotator capped at 1
    is the official formula for ten annotators); legacy targets miss the other spellings, which
    the official accuracy counts after its normalisation, so the two numbers part.
    """
    rows = read_jsonl(world / "index" / "vqa.val.jsonl")
    answer2label = read_answer2label(world / "index" / "answer2label.txt")
    spelled = [r for r in rows if r["answer_type"] == "yes/no" and {"Yes", "yes."} & set(r["raw_answers"])
               and r["raw_answers"].count("yes") < 4]
    chosen = spelled[:3] + [next(r for r in rows if r["answer_type"] == t) for t in ("number", "other")]
    chosen += [r for r in rows if r not in chosen][: ROWS - len(chosen)]
    assert len(spelled) >= 3 and len(chosen) == ROWS
    for row in chosen:
        labels, scores = answer_targets(row["raw_answers"], answer2label, legacy=True)
        row.update(labels=labels, scores=scores)
    return write_index(world, "vqa.eval.jsonl", chosen)


def test_official_accuracy_is_vqa_accuracy_of_the_predictions(world, tokenizer_dir, val_index):
    metrics, predictions = run_evaluate(make_task(world / "index", tokenizer_dir, val_index))
    rows = read_jsonl(val_index)
    assert set(predictions) == {row["qid"] for row in rows}
    by_type: dict[str, list[float]] = {}
    for row in rows:
        by_type.setdefault(row["answer_type"], []).append(vqa_accuracy(predictions[row["qid"]], row["raw_answers"]))
    every = [a for scores in by_type.values() for a in scores]
    assert metrics["questions"] == len(rows)
    assert metrics["vqa_accuracy"] == pytest.approx(100 * sum(every) / len(every))
    for answer_type, key in (("yes/no", "yes_no"), ("number", "number"), ("other", "other")):
        scores = by_type[answer_type]
        assert metrics[f"vqa_accuracy_{key}"] == pytest.approx(100 * sum(scores) / len(scores))
    assert set(predictions.values()) == {"yes"}
    assert metrics["vqa_accuracy_yes_no"] > 0.0
    assert metrics["vqa_score"] < metrics["vqa_accuracy"]  # "Yes" and "yes." count only in the official one


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_index_without_raw_answers_reports_the_soft_score_only(world, tokenizer_dir, val_index):
    old_rows = [{k: v for k, v in row.items() if k not in ("raw_answers", "answer_type")}
                for row in read_jsonl(val_index)]
    old_index = write_index(world, "vqa.old.jsonl", old_rows)
    # listen on the engine's logger itself: whether it propagates depends on earlier tests
    recorder = Recorder()
    engine_logger = logging.getLogger("beit3.training")
    engine_logger.addHandler(recorder)
    try:
        metrics, _ = run_evaluate(make_task(world / "index", tokenizer_dir, old_index))
    finally:
        engine_logger.removeHandler(recorder)
    new_metrics, _ = run_evaluate(make_task(world / "index", tokenizer_dir, val_index))
    assert set(metrics) == {"vqa_score", "questions"}
    assert metrics["vqa_score"] == pytest.approx(new_metrics["vqa_score"])
    notes = [m for m in recorder.messages if "vqa_accuracy not reported" in m]
    assert len(notes) == 1 and "beit3 data build vqav2" in notes[0] and old_index in notes[0]


def _worker(rank: int, world_size: int, port: int, index_root: str, tokenizer: str, val_index: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metrics, _ = run_evaluate(make_task(Path(index_root), Path(tokenizer), val_index), rank, world_size)
        if rank == 0:
            Path(out).write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_two_processes_report_what_one_does(world, tokenizer_dir, val_index, tmp_path):
    one, _ = run_evaluate(make_task(world / "index", tokenizer_dir, val_index))
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, free_port(), str(world / "index"), str(tokenizer_dir), val_index, str(out)),
             nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert set(two) == set(one)
    assert two["questions"] == ROWS  # the padded repeat of the odd shard is not counted
    for key, value in one.items():
        assert two[key] == pytest.approx(value), key
