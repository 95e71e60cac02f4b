"""Stage-wise (VLMo) against joint masked data modeling at the same total budget.

    python benchmarks/stagewise_pretraining.py --demo runs/demo [--steps N] [--out runs/stagewise]

Reads a finished ``beit3 demo`` folder: its medium synthetic world, its text and visual tokenizers
and its joint pretraining run (``configs/pretrain_tiny.yaml``, ``--steps`` steps). Pretrains the same
tiny model for the same number of steps of the same batch in three stages: images only (a third of
the steps), texts only with the vision experts frozen (a third), then all three sources (the rest).
Both backbones, and the random initialisation, then go through the demo's linear probes (frozen
features, ridge regression: deterministic) and their held-out masked-modeling losses are compared.
Prints a Markdown table and writes ``result.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from beit3.demo.pipeline import PROBES, DemoPlan, call, configs_dir, final_metrics, run_probe
from beit3.pretraining.task import STREAMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `beit3 demo` output folder")
    demo_steps = DemoPlan.full().pretrain_steps
    parser.add_argument("--steps", type=int, default=demo_steps, help=f"the joint run's steps (the demo's: {demo_steps})")
    parser.add_argument("--out", type=Path, default=Path("runs/stagewise"))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    from beit3.pretraining.task import export_pretrained

    world, joint = args.demo / "data", args.demo / "runs" / "pretrain"
    if final_metrics(joint).get("step") != args.steps:
        raise SystemExit(f"{joint} did not end at step {args.steps}")
    third = args.steps // 3
    stages = (f"{{name: vision, steps: {third}, sources: [images]}}, "
              f"{{name: language, steps: {third}, sources: [texts], freeze: [vision, shared]}}, "
              f"{{name: joint, steps: {args.steps - 2 * third}}}")
    run = args.out / "pretrain_stagewise"
    began = time.perf_counter()
    if not (run / "final").is_dir():
        call("pretrain", "--recipe", configs_dir() / "pretrain_tiny.yaml", f"data.root={world}",
             f"train.output_dir={run}", f"schedule.max_steps={args.steps}", f"train.eval_every={args.steps}",
             f"train.checkpoint_every={args.steps}", "task.options.tokenizer=tokenizer", "train.resume=auto",
             f"task.options.stages=[{stages}]", *([f"train.threads={args.threads}"] if args.threads else []))
    seconds = time.perf_counter() - began
    models = {"joint": args.demo / "runs" / "pretrained", "stagewise": args.out / "stagewise_model"}
    if not (models["stagewise"] / "config.json").is_file():
        export_pretrained(run, models["stagewise"])
    result: dict[str, dict] = {}
    for name, model in (("joint", models["joint"]), ("stagewise", models["stagewise"]), ("random init", None)):
        held_out = final_metrics(joint if name == "joint" else run) if model is not None else {}
        folder = args.out / "probes" / name.replace(" ", "_")
        result[name] = {"probes": {probe.name: run_probe(probe, world, model, folder / f"{probe.name}.json",
                                                         threads=args.threads) for probe in PROBES},
                        "held_out": {s: held_out.get(f"{s}_loss") for s in STREAMS}}
    result["stagewise_seconds"] = round(seconds, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    names = ("joint", "stagewise", "random init")
    print(f"| measure ({args.steps} steps of 32 images + 32 texts + 32 pairs) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for probe in PROBES:
        print(f"| probe: {probe.title} | " + " | ".join(f"{result[n]['probes'][probe.name]:.2f}" for n in names) + " |")
    for stream in STREAMS:
        print(f"| held-out {stream} loss (nats) | " + " | ".join(
            "–" if result[n]["held_out"][stream] is None else f"{result[n]['held_out'][stream]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
