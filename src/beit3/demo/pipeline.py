"""The stages of the default job and the results table.

Each stage writes into its own folder under ``out`` and is skipped when its output is already
there, so an interrupted demo continues where it stopped (``--fresh`` redoes everything). The
training stages run with ``--resume auto``: a stage killed half-way continues from its newest
checkpoint (or starts afresh, its metrics file cut back, when it had none). The
stages call :func:`beit3.cli.main` with the arguments a user would type (the fine-tunings, two at a
time, run ``beit3`` processes with them), which keeps the demo honest: it can only show what the
commands do.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
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
    train_fraction: float = 1.0
    """The fraction of the task's training samples both starts fine-tune on (``data.train_fraction``:
    the same subset for every run and seed), the data-efficiency regime where pretraining shows most."""

    @property
    def metric(self) -> str:
        """The statistic the task selects its best checkpoint on (from the catalogue)."""
        from beit3.catalogue import get_task

        return get_task(self.task).metric


@dataclass(frozen=True)
class ProbeSpec:
    """One linear probe of the frozen backbone (``beit3 probe``), run on the pretrained weights and on
    the random initialisation the scratch runs start from."""

    task: str
    recipe: str
    features: str
    title: str

    @property
    def name(self) -> str:
        return f"{self.task}_{self.features}"


PROBES = (
    ProbeSpec("classification", "tiny_imagenet.yaml", "image", "image -> class (top-1 %)"),
    ProbeSpec("vqav2", "tiny_vqav2.yaml", "text", "question -> answer (VQA score %)"),
    ProbeSpec("vqav2", "tiny_vqav2.yaml", "pair", "image + question -> answer (VQA score %)"),
)


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
    probes: tuple[ProbeSpec, ...] = PROBES
    itc_steps: int = 0
    """Image-text contrastive tuning of the pretrained model on the pretraining pairs (``beit3 pretrain
    --objective itc``), which every pretrained fine-tuning and probe then starts from (the release
    does so for retrieval only); 0: none, they start from the masked-data-modeling model."""
    itc_overrides: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def full(cls) -> "DemoPlan":
        return cls(world="medium", text_pieces=200, vqkd_steps=300, pretrain_steps=1500, itc_steps=1000,
                   finetunes=_finetunes(scale=1.0))

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(world="small", text_pieces=150, vqkd_steps=30, pretrain_steps=40, itc_steps=10,
                   finetunes=_finetunes(scale=0.1), pretrain_overrides=("task.options.val_size=16",),
                   itc_overrides=("task.options.val_size=16", "data.batch_size=16"))


def _finetunes(scale: float) -> tuple[FinetuneSpec, ...]:
    def steps(n: int) -> int:
        return max(10, int(n * scale))

    # Every task starts from the contrastively tuned model (the release does so for retrieval only):
    # measured on the synthetic world, it beat the masked-data-modeling one on classification (30.5
    # against 27.9 top-1, 3 seeds), captioning (CIDEr 1.02 against 0.63) and NLVR2 (77.3 against
    # 72.0) -- docs/demo.md. Budgets measured with 3 seeds from the 1,000-step tuned model, the
    # shorter ones to pay for that tuning: NLVR2 gains +12.0 +- 7.1 in 500 steps (+8.7 +- 4.4 in 800),
    # captioning +0.15 +- 0.07 in 1,000 (+0.27 +- 0.08 in 1,600).
    return (
        FinetuneSpec("classification", "tiny_imagenet.yaml", "classification (top-1 %)", steps(300),
                     ("task.options.mixup=0.0", "task.options.cutmix=0.0")),
        # VQA on a twentieth of its questions: on all of them the pretrained start lost on every seed
        # (-1.89 +- 1.31, 300-step tuning), on 5% in 1,200 steps it gains +2.09 +- 0.95 (on 10% in
        # 2,400: +3.76 +- 3.05, twice the time) -- docs/demo.md
        FinetuneSpec("vqav2", "tiny_vqav2.yaml", "VQA (VQA score %)", steps(1200), train_fraction=0.05),
        FinetuneSpec("nlvr2", "tiny_nlvr2.yaml", "NLVR2 (accuracy %)", steps(500)),
        FinetuneSpec("retrieval", "tiny_retrieval.yaml", "retrieval (mean R@1/5/10 %)", steps(500)),
        FinetuneSpec("captioning", "tiny_captioning.yaml", "captioning (CIDEr)", steps(1000)),
    )


# ---------------------------------------------------------------------------------------- stages
class Stages:
    """Numbered, timed stages with a header line each; skipped when their output exists."""

    def __init__(self, total: int, fresh: bool) -> None:
        self.total, self.fresh, self.number = total, fresh, 0
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    def _starts(self, title: str, done: Path, note: str = "") -> bool:
        """Number the stage and print its header; False (and says so) when ``done`` exists."""
        self.number += 1
        header = f"[{self.number}/{self.total}] {title}"
        if done.exists() and not self.fresh:
            print(f"{header}: already done ({done}), skipped", flush=True)
            return False
        print(f"\n{header}  (demo time so far {(time.perf_counter() - self.start) / 60:.1f} min{note})", flush=True)
        return True

    def run(self, title: str, done: Path, work: Callable[[], None]) -> None:
        if not self._starts(title, done):
            return
        began = time.perf_counter()
        work()
        self.timings[title] = time.perf_counter() - began
        print(f"    done in {self.timings[title]:.0f} s", flush=True)

    def run_together(self, works: list[tuple[str, Path, list[str]]], logs: Path, threads: int) -> None:
        """Run ``(title, done, beit3 arguments)`` at once, each a ``beit3`` process of ``threads`` CPU
        threads with its output in ``logs/<done's run folder>.log``; skipped as :meth:`run` skips."""
        running: list[tuple[str, Path, subprocess.Popen, float]] = []
        for title, done, args in works:
            log = logs / f"{done.parent.parent.name}.log"
            if not self._starts(title, done, f"; output in {log}"):
                continue
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w", encoding="utf-8") as handle:  # the child keeps its own descriptor
                process = subprocess.Popen([sys.executable, "-m", "beit3", *map(str, args), f"train.threads={threads}"],
                                           stdout=handle, stderr=subprocess.STDOUT)
            running.append((title, log, process, time.perf_counter()))
        failed = []
        try:
            while running:
                time.sleep(0.2)
                for item in [item for item in running if item[2].poll() is not None]:
                    title, log, process, began = item
                    running.remove(item)
                    self.timings[title] = time.perf_counter() - began
                    if process.returncode:
                        failed.append(f"'{title}' failed with exit status {process.returncode} (its output: {log})")
                    else:
                        print(f"    {title}: done in {self.timings[title]:.0f} s", flush=True)
        finally:  # interrupted: stop the runs still going (a rerun resumes them from their checkpoints)
            for _, _, process, _ in running:
                process.terminate()
                process.wait()
        if failed:
            raise RuntimeError("; ".join(failed))


def call(*args: object) -> None:
    """Run ``beit3 <args>`` in this process, as a user would type it; raises when it fails."""
    status = beit3([str(a) for a in args])
    if status:
        raise RuntimeError(f"'beit3 {' '.join(map(str, args))}' failed with exit status {status}")


def run_probe(probe: ProbeSpec, world: Path, model: Path | None, output: Path, *, seed: int = 0,
              threads: int | None = None) -> float:
    """``beit3 probe`` of ``model`` (None: the random initialisation) on the world's data, written to
    ``output`` (skipped when it exists); returns the probe's score."""
    if not output.is_file():
        call("probe", "--recipe", configs_dir() / probe.recipe, "--features", probe.features, "--output", output,
             f"data.root={world / 'index'}", f"task.options.tokenizer={world / 'tokenizer'}", f"train.seed={seed}",
             *([f"train.threads={threads}"] if threads is not None else []),
             *([f"model.pretrained={model}"] if model is not None else []))
    return float(json.loads(output.read_text())["score"])


def configs_dir() -> Path:
    """The recipes folder: ./configs when present, else the one of the source checkout."""
    for candidate in (Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"):
        if (candidate / "pretrain_tiny.yaml").is_file():
            return candidate
    raise FileNotFoundError("cannot find the configs/ folder with the tiny recipes; run 'beit3 demo' from "
                            "a checkout of the beit3 repository (the recipes are not part of the wheel)")


def run_name(task: str, start: str, repeat: int = 0) -> str:
    """The run folder of one fine-tuning: ``<task>_<start>``, and ``<task>_<start>_seed<k>`` for the
    k-th extra fine-tuning seed (so a one-seed demo's folders are those of a many-seed one)."""
    return f"{task}_{start}" + (f"_seed{repeat}" if repeat else "")


def default_jobs() -> int:
    """Fine-tunings run at once by default: two where the machine has two cores or more."""
    return min(2, os.cpu_count() or 1)


def run_demo(out: str | Path, plan: DemoPlan, *, seed: int = 0, fresh: bool = False,
             threads: int | None = None, seeds: int = 1, jobs: int | None = None) -> dict[str, Any]:
    """Run every stage into ``out`` and write ``out/report``; returns the results.

    ``seeds``: fine-tune each task from each start with this many seeds (``seed``, ``seed + 1``, ...),
    on the same world and the same pretrained model, and report each gain's mean and spread.
    ``jobs``: fine-tunings run at once (default :func:`default_jobs`), each its own ``beit3`` process
    of ``threads`` threads (default: the cores shared out); 1 runs them one by one in this process.
    A tiny model's run on one thread is only ~1.25x slower than on two, so two runs at once finish
    the fine-tunings ~1.3x sooner (each process pays for importing PyTorch); a run's numbers on one
    thread may differ in the last bits from two threads', and then diverge as two seeds do."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configs_dir()
    world, runs = out / "data", out / "runs"
    tokenizer, vqkd, pretrained = world / "tokenizer", world / "vqkd", runs / "pretrained"
    itc = runs / "itc" / "final" if plan.itc_steps else pretrained
    stages = Stages(total=4 + bool(plan.itc_steps) + bool(plan.probes) + 2 * len(plan.finetunes) * seeds, fresh=fresh)
    # train.resume=auto: a stage killed half-way continues from its newest checkpoint (or starts over when
    # it had none) instead of being refused for the run folder it left behind
    common = [f"train.seed={seed}", "train.progress_bar=true", "train.resume=auto",
              *([f"train.threads={threads}"] if threads is not None else [])]

    stages.run(f"generating the synthetic world ({plan.world})", world / "synthetic.json",
               lambda: call("data", "synthetic", "--out", world, "--size", plan.world, "--seed", seed))
    stages.run(f"training the text tokenizer ({plan.text_pieces} BPE pieces)", tokenizer / "tokenizer_config.json",
               lambda: call("tokenizer", "train", "--input", world / "corpus.txt", "--vocab-size", plan.text_pieces,
                            "--model-type", "bpe", "--num-threads", 1, "--output", tokenizer))
    stages.run(f"training the VQ-KD visual tokenizer (HOG teacher, {plan.vqkd_steps} steps)", vqkd / "vqkd_config.json",
               lambda: call("visual-tokenizer", "train", "--images", world / "pretrain" / "images" / "*.tar",
                            "--preset", "tiny", "--codebook-size", 256, "--steps", plan.vqkd_steps,
                            "--batch-size", 64, "--lr", "1e-3", "--seed", seed, "--out", vqkd))

    def pretrain() -> None:
        from beit3.pretraining.task import export_pretrained

        run = runs / "pretrain"
        call("pretrain", "--recipe", configs / "pretrain_tiny.yaml", f"data.root={world}",
             f"train.output_dir={run}", f"schedule.max_steps={plan.pretrain_steps}",
             f"train.eval_every={max(plan.pretrain_steps // 3, 1)}", f"train.checkpoint_every={plan.pretrain_steps}",
             "task.options.tokenizer=tokenizer", *common, *plan.pretrain_overrides)
        export_pretrained(run, pretrained)

    stages.run(f"pretraining a tiny BEiT-3 by masked data modeling ({plan.pretrain_steps} steps)",
               pretrained / "config.json", pretrain)

    if plan.itc_steps:
        stages.run(f"contrastive tuning of the pretrained model on the pretraining pairs ({plan.itc_steps} steps)",
                   itc / "config.json",
                   lambda: call("pretrain", "--recipe", configs / "pretrain_itc_tiny.yaml", f"data.root={world}",
                                f"model.pretrained={pretrained}", f"train.output_dir={runs / 'itc'}",
                                f"schedule.max_steps={plan.itc_steps}", f"train.eval_every={plan.itc_steps}",
                                f"train.checkpoint_every={plan.itc_steps}",
                                f"schedule.warmup_steps={max(plan.itc_steps // 10, 1)}", *common, *plan.itc_overrides))

    def probes() -> None:
        for probe in plan.probes:  # the weights the task's fine-tuning starts from
            for start in ("pretrained", "scratch"):
                run_probe(probe, world, itc if start == "pretrained" else None,
                          runs / "probes" / f"{probe.name}_{start}.json", seed=seed, threads=threads)

    if plan.probes:
        last = plan.probes[-1]
        stages.run(f"linear probes of the frozen backbone, pretrained and at random initialisation ({len(plan.probes)} "
                   "probes)", runs / "probes" / f"{last.name}_scratch.json", probes)

    finetunes = []
    for repeat in range(seeds):
        for spec in plan.finetunes:
            for start in ("pretrained", "scratch"):
                run = runs / run_name(spec.task, start, repeat)
                args = ["finetune", "--recipe", configs / spec.recipe, f"data.root={world / 'index'}",
                        f"train.output_dir={run}", f"task.options.tokenizer={tokenizer}",
                        f"schedule.max_steps={spec.steps}", "schedule.warmup_steps=" + str(max(spec.steps // 10, 1)),
                        f"train.eval_every={spec.steps}", f"train.checkpoint_every={spec.steps}",
                        *common, f"train.seed={seed + repeat}", f"data.train_fraction={spec.train_fraction}",
                        *spec.overrides]
                if start == "pretrained":
                    args.append(f"model.pretrained={itc}")
                origin = "the pretrained model" if start == "pretrained" else "scratch"
                finetunes.append((f"fine-tuning {spec.task} from {origin} ({spec.steps} steps"
                                  + (f", seed {seed + repeat})" if seeds > 1 else ")"), run / "final" / "config.json", args))
    if jobs == 1:
        for title, done, args in finetunes:
            stages.run(title, done, lambda a=args: call(*a))
    else:
        per_job = threads if threads is not None else max(1, (os.cpu_count() or 1) // jobs)
        for first in range(0, len(finetunes), jobs):  # a task's two starts side by side: similar lengths
            stages.run_together(finetunes[first:first + jobs], runs / "logs", per_job)

    results = collect_results(out, plan, seeds)
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


def spread(values: list[float]) -> float:
    """The sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect_results(out: Path, plan: DemoPlan, seeds: int = 1) -> dict[str, Any]:
    """Each task's score per start: the mean over the seeds, with every seed's value and gain."""
    world, runs = out / "data", out / "runs"
    rows = []
    for spec in plan.finetunes:
        scores = {start: [final_metrics(runs / run_name(spec.task, start, k))[spec.metric] for k in range(seeds)]
                  for start in ("pretrained", "scratch")}
        gains = [p - s for p, s in zip(scores["pretrained"], scores["scratch"])]
        rows.append({"task": spec.task, "title": spec.title, "metric": spec.metric,
                     "pretrained": sum(scores["pretrained"]) / seeds, "scratch": sum(scores["scratch"]) / seeds,
                     "pretrained_per_seed": scores["pretrained"], "scratch_per_seed": scores["scratch"],
                     "gain_per_seed": gains, "gain_spread": spread(gains),
                     "baseline": baseline(spec.task, world / "index"), "steps": spec.steps})
    probes = []
    for probe in plan.probes:
        scores = {start: json.loads((runs / "probes" / f"{probe.name}_{start}.json").read_text())
                  for start in ("pretrained", "scratch")}
        probes.append({"name": probe.name, "title": probe.title, "task": probe.task, "features": probe.features,
                       "pretrained": scores["pretrained"]["score"], "scratch": scores["scratch"]["score"]})
    pretraining = final_metrics(runs / "pretrain")
    return {"plan": asdict(plan), "seeds": seeds, "tasks": rows, "probes": probes,
            "pretraining": {k: v for k, v in pretraining.items() if isinstance(v, (int, float))}}


def baseline(task: str, index: Path) -> dict[str, Any]:
    """What a model that does not look at the image scores, computed from the data: the task's
    own ``baseline`` (see the catalogue); none for a task without one."""
    from beit3.catalogue import get_task

    spec = get_task(task)
    return spec.baseline(spec, index) if spec.baseline is not None else {"name": "none", "value": math.nan}


def print_table(results: dict[str, Any]) -> None:
    seeds = results.get("seeds", 1)
    print("\nBEiT-3 tiny on the synthetic world: pretrained vs from scratch (same fine-tuning budget"
          + (f", mean of {seeds} fine-tuning seeds; spread: standard deviation of the gain)" if seeds > 1 else ")"))
    print(f"{'task':<32}{'pretrained':>12}{'scratch':>10}{'gain':>9}" + (f"{'spread':>8}" if seeds > 1 else "")
          + "   baseline")
    for row in results["tasks"]:
        base = row["baseline"]
        base_text = "" if math.isnan(base["value"]) else f"{base['value']:.2f} ({base['name']})"
        print(f"{row['title']:<32}{row['pretrained']:>12.2f}{row['scratch']:>10.2f}"
              f"{row['pretrained'] - row['scratch']:>+9.2f}" + (f"{row['gain_spread']:>8.2f}" if seeds > 1 else "")
              + f"   {base_text}")
    if results.get("probes"):
        print("\nLinear probes of the frozen backbone: pretrained vs its random initialisation")
        for row in results["probes"]:
            print(f"{row['title']:<42}{row['pretrained']:>12.2f}{row['scratch']:>10.2f}"
                  f"{row['pretrained'] - row['scratch']:>+9.2f}")
    sys.stdout.flush()
