"""The stages of the default job and the results table.

Each stage writes into its own folder under ``out`` and is skipped when its output is already
there, so an interrupted demo continues where it stopped (``--fresh`` redoes everything). The
training stages run with ``--resume auto``: a stage killed half-way continues from its newest
checkpoint (or starts afresh, its metrics file cut back, when it had none). The
stages call :func:`beit3.cli.main` with the arguments a user would type, which keeps the demo
honest: it can only show what the commands do.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from beit3.cli import main as beit3


@dataclass(frozen=True)
class FinetuneSpec:
    """One downstream task of the demo: its tiny recipe, the metric reported, and its budget."""

    task: str
    recipe: str
    title: str
    steps: int
    overrides: tuple[str, ...] = ()

    @property
    def metric(self) -> str:
        """The statistic the task selects its best checkpoint on (from the catalogue)."""
        from beit3.catalogue import get_task

        return get_task(self.task).metric


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of every stage."""

    world: str
    text_pieces: int
    vqkd_steps: int
    pretrain_steps: int
    finetunes: tuple[FinetuneSpec, ...]
    eval_every: int = 0
    pretrain_overrides: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def full(cls) -> "DemoPlan":
        return cls(world="medium", text_pieces=200, vqkd_steps=300, pretrain_steps=1500,
                   finetunes=_finetunes(scale=1.0))

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(world="small", text_pieces=150, vqkd_steps=30, pretrain_steps=40,
                   finetunes=_finetunes(scale=0.1), pretrain_overrides=("task.options.val_size=16",))


def _finetunes(scale: float) -> tuple[FinetuneSpec, ...]:
    def steps(n: int) -> int:
        return max(10, int(n * scale))

    return (
        FinetuneSpec("classification", "tiny_imagenet.yaml", "classification (top-1 %)", steps(300),
                     ("task.options.mixup=0.0", "task.options.cutmix=0.0")),
        FinetuneSpec("vqav2", "tiny_vqav2.yaml", "VQA (VQA score %)", steps(2400)),
        FinetuneSpec("nlvr2", "tiny_nlvr2.yaml", "NLVR2 (accuracy %)", steps(800)),
        FinetuneSpec("retrieval", "tiny_retrieval.yaml", "retrieval (mean R@1/5/10 %)", steps(500)),
        FinetuneSpec("captioning", "tiny_captioning.yaml", "captioning (CIDEr)", steps(1600)),
    )


# ---------------------------------------------------------------------------------------- stages
class Stages:
    """Numbered, timed stages with a header line each; skipped when their output exists."""

    def __init__(self, total: int, fresh: bool) -> None:
        self.total, self.fresh, self.number = total, fresh, 0
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self, title: str, done: Path, work: Callable[[], None]) -> None:
        self.number += 1
        elapsed = time.perf_counter() - self.start
        header = f"[{self.number}/{self.total}] {title}"
        if done.exists() and not self.fresh:
            print(f"{header}: already done ({done}), skipped", flush=True)
            return
        print(f"\n{header}  (demo time so far {elapsed / 60:.1f} min)", flush=True)
        began = time.perf_counter()
        work()
        self.timings[title] = time.perf_counter() - began
        print(f"    done in {self.timings[title]:.0f} s", flush=True)


def _call(*args: str) -> None:
    status = beit3([str(a) for a in args])
    if status:
        raise RuntimeError(f"'beit3 {' '.join(map(str, args))}' failed with exit status {status}")


def configs_dir() -> Path:
    """The recipes folder: ./configs when present, else the one of the source checkout."""
    for candidate in (Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"):
        if (candidate / "pretrain_tiny.yaml").is_file():
            return candidate
    raise FileNotFoundError("cannot find the configs/ folder with the tiny recipes; run 'beit3 demo' from "
                            "a checkout of the beit3 repository (the recipes are not part of the wheel)")


def run_demo(out: str | Path, plan: DemoPlan, *, seed: int = 0, fresh: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Run every stage into ``out`` and write ``out/report``; returns the results."""
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configs_dir()
    world, runs = out / "data", out / "runs"
    tokenizer, vqkd, pretrained = world / "tokenizer", world / "vqkd", runs / "pretrained"
    stages = Stages(total=4 + 2 * len(plan.finetunes), fresh=fresh)
    # train.resume=auto: a stage killed half-way continues from its newest checkpoint (or starts over when
    # it had none) instead of being refused for the run folder it left behind
    common = [f"train.seed={seed}", "train.progress_bar=true", "train.resume=auto",
              *([f"train.threads={threads}"] if threads is not None else [])]

    stages.run(f"generating the synthetic world ({plan.world})", world / "synthetic.json",
               lambda: _call("data", "synthetic", "--out", world, "--size", plan.world, "--seed", seed))
    stages.run(f"training the text tokenizer ({plan.text_pieces} BPE pieces)", tokenizer / "tokenizer_config.json",
               lambda: _call("tokenizer", "train", "--input", world / "corpus.txt", "--vocab-size", plan.text_pieces,
                             "--model-type", "bpe", "--num-threads", 1, "--output", tokenizer))
    stages.run(f"training the VQ-KD visual tokenizer (HOG teacher, {plan.vqkd_steps} steps)", vqkd / "vqkd_config.json",
               lambda: _call("visual-tokenizer", "train", "--images", world / "pretrain" / "images" / "*.tar",
                             "--preset", "tiny", "--codebook-size", 256, "--steps", plan.vqkd_steps,
                             "--batch-size", 64, "--lr", "1e-3", "--seed", seed, "--out", vqkd))

    def pretrain() -> None:
        from beit3.pretraining.task import export_pretrained

        run = runs / "pretrain"
        _call("pretrain", "--recipe", configs / "pretrain_tiny.yaml", f"data.root={world}",
              f"train.output_dir={run}", f"schedule.max_steps={plan.pretrain_steps}",
              f"train.eval_every={max(plan.pretrain_steps // 3, 1)}", f"train.checkpoint_every={plan.pretrain_steps}",
              "task.options.tokenizer=tokenizer", *common, *plan.pretrain_overrides)
        export_pretrained(run, pretrained)

    stages.run(f"pretraining a tiny BEiT-3 by masked data modeling ({plan.pretrain_steps} steps)",
               pretrained / "config.json", pretrain)

    for spec in plan.finetunes:
        for start in ("pretrained", "scratch"):
            run = runs / f"{spec.task}_{start}"
            args = ["finetune", "--recipe", configs / spec.recipe, f"data.root={world / 'index'}",
                    f"train.output_dir={run}", f"task.options.tokenizer={tokenizer}",
                    f"schedule.max_steps={spec.steps}", "schedule.warmup_steps=" + str(max(spec.steps // 10, 1)),
                    f"train.eval_every={spec.steps}", f"train.checkpoint_every={spec.steps}",
                    *common, *spec.overrides]
            if start == "pretrained":
                args.append(f"model.pretrained={pretrained}")
            stages.run(f"fine-tuning {spec.task} from {'the pretrained model' if start == 'pretrained' else 'scratch'} "
                       f"({spec.steps} steps)", run / "final" / "config.json", lambda a=args: _call(*a))

    results = collect_results(out, plan)
    from beit3.demo.report_writer import write_report

    report = write_report(out, plan, results)
    print_table(results)
    total = time.perf_counter() - stages.start
    print(f"\nreport: {report} (whole demo {total / 60:.1f} min this run)")
    return results


# ---------------------------------------------------------------------------------------- results
def final_metrics(run: Path) -> dict[str, float]:
    """The last validation record of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [row for row in rows if row.get("split") == "val"]
    if not evaluations:
        raise ValueError(f"{run / 'metrics.jsonl'} has no validation record; the run did not finish")
    return evaluations[-1]


def collect_results(out: Path, plan: DemoPlan) -> dict[str, Any]:
    world, runs = out / "data", out / "runs"
    rows = []
    for spec in plan.finetunes:
        pretrained = final_metrics(runs / f"{spec.task}_pretrained")[spec.metric]
        scratch = final_metrics(runs / f"{spec.task}_scratch")[spec.metric]
        rows.append({"task": spec.task, "title": spec.title, "metric": spec.metric, "pretrained": pretrained,
                     "scratch": scratch, "baseline": baseline(spec.task, world / "index"), "steps": spec.steps})
    pretraining = final_metrics(runs / "pretrain")
    return {"plan": asdict(plan), "tasks": rows,
            "pretraining": {k: v for k, v in pretraining.items() if isinstance(v, (int, float))}}


def baseline(task: str, index: Path) -> dict[str, Any]:
    """What a model that does not look at the image scores, computed from the data: the task's
    own ``baseline`` (see the catalogue); none for a task without one."""
    from beit3.catalogue import get_task

    spec = get_task(task)
    return spec.baseline(spec, index) if spec.baseline is not None else {"name": "none", "value": math.nan}


def print_table(results: dict[str, Any]) -> None:
    print("\nBEiT-3 tiny on the synthetic world: pretrained vs from scratch (same fine-tuning budget)")
    print(f"{'task':<32}{'pretrained':>12}{'scratch':>10}{'gain':>9}   baseline")
    for row in results["tasks"]:
        base = row["baseline"]
        base_text = "" if math.isnan(base["value"]) else f"{base['value']:.2f} ({base['name']})"
        print(f"{row['title']:<32}{row['pretrained']:>12.2f}{row['scratch']:>10.2f}"
              f"{row['pretrained'] - row['scratch']:>+9.2f}   {base_text}")
    sys.stdout.flush()
