"""`beit3 demo --quick`: every stage of the default job runs and the report is complete (~1 min)."""
from __future__ import annotations

import json
import math
import shutil

import yaml
from PIL import Image

from beit3.cli import main
from beit3.demo.report import Series, line_chart, retrieval_grid

TASKS = {"classification", "vqav2", "nlvr2", "retrieval", "captioning"}


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "scratch" in printed

    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    assert {row["task"] for row in results["tasks"]} == TASKS
    for row in results["tasks"]:
        assert math.isfinite(row["pretrained"]) and math.isfinite(row["scratch"]), row
    # the table in results.md holds the same numbers as results.json
    table = (report / "results.md").read_text()
    for row in results["tasks"]:
        assert f"| {row['title']} | {row['pretrained']:.2f} | {row['scratch']:.2f} |" in table
    # linear probes of the frozen backbone: pretrained and random init, each in the table
    assert [row["name"] for row in results["probes"]] == ["classification_image", "vqav2_text", "vqav2_pair"]
    for row in results["probes"]:
        assert 0 <= row["pretrained"] <= 100 and 0 <= row["scratch"] <= 100
        assert f"| {row['title']} | {row['pretrained']:.2f} | {row['scratch']:.2f} |" in table
    for name in ("loss_curves.png", "captioning.png", "vqa.png", "retrieval.png"):
        with Image.open(report / name) as image:
            assert image.width > 200 and image.height > 200, name
    # the pretrained runs start from the contrastively tuned model (the MDM export, tuned on the pairs)
    starts = {task: yaml.safe_load((out / "runs" / f"{task}_pretrained" / "run.yaml").read_text())["model"]["pretrained"]
              for task in TASKS}
    assert set(starts.values()) == {str(out / "runs" / "itc" / "final")}
    itc = yaml.safe_load((out / "runs" / "itc" / "run.yaml").read_text())
    assert itc["task"]["name"] == "itc" and itc["model"]["pretrained"] == str(out / "runs" / "pretrained")
    assert "contrastive tuning" in table
    # VQA fine-tunes on a twentieth of its questions, both starts, the others on all their samples
    fractions = {task: {start: yaml.safe_load((out / "runs" / f"{task}_{start}" / "run.yaml").read_text())["data"]
                        ["train_fraction"] for start in ("pretrained", "scratch")} for task in TASKS}
    assert fractions["vqav2"] == {"pretrained": 0.05, "scratch": 0.05}
    assert all(value == {"pretrained": 1.0, "scratch": 1.0} for task, value in fractions.items() if task != "vqav2")
    assert "fine-tune vqav2 on 5% of the training samples" in table
    # pretraining really ran: the held-out text loss fell well below ln(vocabulary), where it starts
    pre = results["pretraining"]
    vocabulary = results["plan"]["text_pieces"] + 2
    assert pre["text_mlm_loss"] < math.log(vocabulary) - 0.5

    # a second run finds every stage done and only rewrites the report
    (report / "results.md").unlink()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already done") == 16
    assert (report / "results.md").read_text() == table

    # a stage killed before its checkpoint: the rerun redoes it (train.resume=auto finds no checkpoint)
    # with a fresh metrics.jsonl, not the killed run's records followed by the new run's again
    run = out / "runs" / "classification_scratch"
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints")
    (run / "summary.json").unlink()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already done") == 15
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == results["tasks"][0]["steps"]


def test_baselines_come_from_the_data(tmp_path):
    from beit3.demo.pipeline import baseline

    index = tmp_path
    rows = [{"label": 0}] * 3 + [{"label": 1}]
    (index / "imagenet.train.index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (index / "imagenet.val.index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"label": 0}, {"label": 2}]))
    assert baseline("imagenet", index)["value"] == 50.0

    train = [{"text": "how many shapes are there?", "labels": [4], "scores": [1.0]},
             {"text": "how many shapes are there?", "labels": [4, 2], "scores": [1.0, 0.3]},
             {"text": "how many shapes are visible?", "labels": [2], "scores": [1.0]},
             {"text": "is there a red circle?", "labels": [0], "scores": [1.0]}]
    val = [{"text": "how many shapes are there?", "labels": [2, 4], "scores": [1.0, 0.3]},
           {"text": "is there a blue square?", "labels": [0], "scores": [0.6]},
           {"text": "what colour is it?", "labels": [5], "scores": [1.0]}]
    # the model's training questions (train + trainable_val) and its validation split (rest_val)
    (index / "vqa.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:2]))
    (index / "vqa.trainable_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[2:]))
    (index / "vqa.rest_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    (index / "vqa.val.jsonl").write_text(json.dumps(train[3]) + "\n")  # not what the model is scored on
    # "how many shapes" -> 4 (score 2.0 beats 2's 1.3); "is there a" -> 0; unseen type -> nothing
    assert math.isclose(baseline("vqav2", index)["value"], 100 * (0.3 + 0.6 + 0.0) / 3)

    # captioning: each image scored with the next image's caption in the same reference slot
    val = [{"image_id": 1, "references": ["a red circle", "one red shape"]},
           {"image_id": 2, "references": ["a blue square", "one blue shape"]},
           {"image_id": 3, "references": ["a red circle", "one red shape"]}]
    (index / "coco_captioning.val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    from beit3.tasks.metrics import cider_d
    refs = {r["image_id"]: r["references"] for r in val}
    expected = [cider_d({1: refs[2][j], 2: refs[3][j], 3: refs[1][j]}, refs)[0] for j in (0, 1)]
    assert math.isclose(baseline("captioning", index)["value"], sum(expected) / 2)
    assert 0 < baseline("captioning", index)["value"] < cider_d({k: v[0] for k, v in refs.items()}, refs)[0]


def test_a_chart_never_draws_a_line_back_in_step():
    """A resumed run logs steps again (10..160 then 10..240): drawn in file order, the curve ran back
    across the chart as a false diagonal. The points are drawn in step order, the later one winning."""
    chart = line_chart([("resumed", [Series("x", [0, 10, 0, 10], [0.0, 0.0, 1.0, 1.0])])], columns=1)
    blue = (31, 119, 180)
    # plot area (50, 24)-(410, 246), y from -0.05 to 1.05: the false diagonal would cross (230, 135)
    middle = {chart.getpixel((x, y)) for x in range(225, 236) for y in range(125, 146)}
    assert blue not in middle
    top = {chart.getpixel((230, y)) for y in range(30, 40)}  # the curve as it is now: flat at 1.0
    assert blue in top
    from beit3.demo.report import increasing

    assert increasing([10, 20, 30, 10, 20], [5.0, 4.0, 3.0, 4.5, 3.5]) == ([10, 20, 30], [4.5, 3.5, 3.0])


def test_charts_draw_every_series(tmp_path):
    chart = line_chart([("a", [Series("x", [0, 1, 2], [3.0, 2.0, 1.0]), Series("y", [0, 2], [1.0, 1.5])]),
                        ("empty", [])])
    assert chart.size == (840, 280)
    # the first series' colour appears in the first panel
    pixels = set(chart.crop((0, 0, 420, 280)).getdata())
    assert (31, 119, 180) in pixels and (255, 127, 14) in pixels
    grid = retrieval_grid([("query", [(Image.new("RGB", (8, 8), (255, 0, 0)), True),
                                      (Image.new("RGB", (8, 8), (0, 0, 255)), False)])], image_size=32)
    colours = set(grid.getdata())
    assert (255, 0, 0) in colours and (0, 0, 255) in colours and (30, 150, 60) in colours


def test_seeds_are_reported_as_mean_gain_and_spread(tmp_path):
    """`beit3 demo --seeds 3`: every seed's runs are read, the table shows mean, spread and each gain."""
    from beit3.demo.pipeline import DemoPlan, FinetuneSpec, collect_results, run_name
    from beit3.demo.report_writer import results_markdown

    index = tmp_path / "data" / "index"
    index.mkdir(parents=True)
    for split in ("train", "val"):
        (index / f"imagenet.{split}.index.jsonl").write_text(json.dumps({"label": 0}) + "\n")
    plan = DemoPlan(world="small", text_pieces=10, vqkd_steps=1, pretrain_steps=1, probes=(),
                    finetunes=(FinetuneSpec("classification", "tiny_imagenet.yaml", "classification (top-1 %)", 10),))

    def write_run(name: str, **metrics: float) -> None:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": 10, **metrics}) + "\n")

    write_run("pretrain", text_mlm_loss=1.0)
    for k, (pretrained, scratch) in enumerate([(30.0, 20.0), (28.0, 22.0), (35.0, 21.0)]):
        write_run(run_name("classification", "pretrained", k), acc1=pretrained)
        write_run(run_name("classification", "scratch", k), acc1=scratch)
    assert run_name("classification", "scratch", 0) == "classification_scratch"
    assert run_name("classification", "scratch", 2) == "classification_scratch_seed2"
    results = collect_results(tmp_path, plan, seeds=3)
    row = results["tasks"][0]
    assert row["pretrained"] == 31.0 and row["scratch"] == 21.0 and row["gain_per_seed"] == [10.0, 6.0, 14.0]
    assert math.isclose(row["gain_spread"], 4.0)
    assert "| classification (top-1 %) | 31.00 | 21.00 | +10.00 | 4.00 | +10.00 / +6.00 / +14.00 |" in results_markdown(results)
    # one seed reads only the seed's own runs and keeps the one-seed table
    one = collect_results(tmp_path, plan)
    assert one["tasks"][0]["pretrained"] == 30.0 and one["tasks"][0]["gain_spread"] == 0.0
    assert "| classification (top-1 %) | 30.00 | 20.00 | +10.00 | 100.00 (most frequent class) |" in results_markdown(one)
    assert "training samples" not in results_markdown(one)
    # a task fine-tuned on a fraction of its training samples says so
    fewer = DemoPlan(world="small", text_pieces=10, vqkd_steps=1, pretrain_steps=1, probes=(),
                     finetunes=(FinetuneSpec("classification", "tiny_imagenet.yaml", "classification (top-1 %)", 10,
                                             train_fraction=0.25),))
    assert "fine-tune classification on 25% of the training samples" in results_markdown(collect_results(tmp_path, fewer))


def test_fine_tunings_side_by_side_skip_finished_runs_and_name_the_log_of_a_failure(tmp_path, capsys):
    """`--jobs 2`: each fine-tuning its own `beit3` process with its output in a log; a finished run is
    skipped without a process, a failed one raises naming its log, after the others have finished."""
    import pytest

    from beit3.demo.pipeline import Stages

    done = tmp_path / "runs" / "finished" / "final" / "config.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    stages = Stages(total=2, fresh=False)
    missing = tmp_path / "missing.yaml"
    works = [("finished run", done, ["finetune", "--recipe", missing]),
             ("broken run", tmp_path / "runs" / "broken" / "final" / "config.json", ["finetune", "--recipe", missing])]
    with pytest.raises(RuntimeError, match=r"'broken run' failed with exit status \d+ \(its output: .*broken\.log\)"):
        stages.run_together(works, tmp_path / "logs", threads=1)
    printed = capsys.readouterr().out
    assert "[1/2] finished run: already done" in printed and "[2/2] broken run" in printed
    assert not (tmp_path / "logs" / "finished.log").exists()
    assert "missing.yaml" in (tmp_path / "logs" / "broken.log").read_text()


def test_an_interrupted_side_by_side_stage_stops_its_runs(tmp_path, monkeypatch):
    """Ctrl-C while fine-tunings run side by side stops them too (a rerun resumes them)."""
    import subprocess
    import sys

    import pytest

    from beit3.demo import pipeline

    started = []
    real_popen = subprocess.Popen

    def popen(args, **kwargs):  # a run that would go on for a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.subprocess, "Popen", popen)
    monkeypatch.setattr(pipeline.time, "sleep", interrupt)
    works = [(f"run {k}", tmp_path / f"run{k}" / "final" / "config.json", ["finetune"]) for k in range(2)]
    with pytest.raises(KeyboardInterrupt):
        pipeline.Stages(total=2, fresh=False).run_together(works, tmp_path / "logs", threads=1)
    assert len(started) == 2 and all(process.poll() is not None for process in started)
