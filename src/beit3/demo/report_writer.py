"""The demo's report folder: the results table as Markdown and JSON, loss curves, example predictions.

Predictions come from :mod:`beit3.pipelines` on the fine-tuned checkpoints, the same code as
``beit3 predict``; the retrieval grid ranks the validation images for a few of their captions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from beit3.catalogue import spec_for_model
from beit3.io import atomic_write_text
from beit3.demo.pipeline import DemoPlan
from beit3.demo.report import BAD, GOOD, INK, SERIES_COLOURS, Series, captioned_grid, line_chart, retrieval_grid
from beit3.pretraining.task import STREAMS

EXAMPLES = 8


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(run: Path, key: str, split: str = "train") -> tuple[list[float], list[float]]:
    rows = [r for r in _rows(run / "metrics.jsonl") if r.get("split") == split and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def write_report(out: Path, plan: DemoPlan, results: dict[str, Any]) -> Path:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "results.json", json.dumps(results, indent=2))
    atomic_write_text(report / "results.md", results_markdown(results))
    runs, index = out / "runs", out / "data" / "index"
    loss_curves(runs, plan).save(report / "loss_curves.png")
    tasks = {spec.task for spec in plan.finetunes}
    if "captioning" in tasks:
        captioning_examples(runs, index).save(report / "captioning.png")
    if "vqav2" in tasks:
        vqa_examples(runs, index).save(report / "vqa.png")
    if "retrieval" in tasks:
        retrieval_examples(runs, index).save(report / "retrieval.png")
    return report


def results_markdown(results: dict[str, Any]) -> str:
    seeds = results.get("seeds", 1)
    lines = ["# BEiT-3 demo: pretrained vs from scratch on the synthetic world", "",
             "Each task is fine-tuned with the same recipe and number of steps twice: once from the "
             "masked-data-modeling checkpoint, once from random weights. Validation scores at the end."]
    fractions = [f"{spec['task']} on {100 * spec['train_fraction']:g}%" for spec in results["plan"]["finetunes"]
                 if spec.get("train_fraction", 1.0) < 1]
    if fractions:
        lines += ["", f"Both starts fine-tune {', '.join(fractions)} of the training samples (the same ones, "
                  "`data.train_fraction`), the data-efficiency regime where pretraining shows most; the "
                  "other tasks on all of them."]
    if results["plan"].get("itc_steps"):
        lines += ["", "The pretrained runs start from that checkpoint after "
                  f"{results['plan']['itc_steps']} steps of image-text contrastive tuning on the pretraining pairs "
                  "(`beit3 pretrain --objective itc`, no task data; the release tunes so before retrieval only)."]
    if seeds == 1:
        lines += ["", "| task | pretrained | scratch | gain | baseline without the image |", "|---|---|---|---|---|"]
    else:
        lines += ["", f"Each pair of runs is repeated with {seeds} fine-tuning seeds (same world, same pretrained "
                  "model): the scores are means, the spread is the standard deviation of the seeds' gains.", "",
                  "| task | pretrained | scratch | gain | spread | gain per seed | baseline without the image |",
                  "|---|---|---|---|---|---|---|"]
    for row in results["tasks"]:
        base = row["baseline"]
        base_text = "–" if math.isnan(base["value"]) else f"{base['value']:.2f} ({base['name']})"
        gain = row["pretrained"] - row["scratch"]
        if seeds == 1:
            lines.append(f"| {row['title']} | {row['pretrained']:.2f} | {row['scratch']:.2f} | {gain:+.2f} | {base_text} |")
        else:
            per_seed = " / ".join(f"{g:+.2f}" for g in row["gain_per_seed"])
            lines.append(f"| {row['title']} | {row['pretrained']:.2f} | {row['scratch']:.2f} | {gain:+.2f} | "
                         f"{row['gain_spread']:.2f} | {per_seed} | {base_text} |")
    if results.get("probes"):
        lines += ["", "## Linear probes of the frozen backbone", "",
                  "A ridge regression on the pooled final states of the frozen backbone (`beit3 probe`), "
                  "fitted on the task's training split and scored on its validation split: the pretrained "
                  "weights against the random initialisation the scratch runs start from. Deterministic, "
                  "so a difference is the weights', not a seed's.", "",
                  "| probe | pretrained | random init | gain |", "|---|---|---|---|"]
        for row in results["probes"]:
            lines.append(f"| {row['title']} | {row['pretrained']:.2f} | {row['scratch']:.2f} | "
                         f"{row['pretrained'] - row['scratch']:+.2f} |")
    pre = results["pretraining"]
    lines += ["", "## Pretraining (held-out, nats)", "", "| stream | loss | unigram entropy of the targets |",
              "|---|---|---|"]
    for stream in STREAMS:
        if f"{stream}_loss" in pre:
            lines.append(f"| {stream} | {pre[f'{stream}_loss']:.3f} | {pre.get(f'{stream}_unigram_entropy', math.nan):.3f} |")
    if "pair_mlm_loss_shuffled" in pre:
        lines += ["", f"Pair MLM with each caption shown another sample's image: "
                      f"{pre['pair_mlm_loss_shuffled']:.3f} nats vs {pre['pair_mlm_loss']:.3f} with its own image."]
    lines += ["", "Pictures: loss_curves.png, captioning.png, vqa.png, retrieval.png.", ""]
    return "\n".join(lines)


def loss_curves(runs: Path, plan: DemoPlan) -> Image.Image:
    streams = [Series(stream, *_curve(runs / "pretrain", f"{stream}_loss")) for stream in STREAMS]
    panels = [("pretraining: loss per stream (train)", [s for s in streams if s.x])]
    for spec in plan.finetunes:
        panels.append((f"{spec.task}: training loss",
                       [Series(start, *_curve(runs / f"{spec.task}_{start}", "loss")) for start in ("pretrained", "scratch")]))
    return line_chart(panels)


def _val_rows(index: Path, name: str) -> list[dict[str, Any]]:
    return _rows(index / name)


def _image(index: Path, row: dict[str, Any]) -> Image.Image:
    return Image.open(index / row["image_path"]).convert("RGB")


def captioning_examples(runs: Path, index: Path) -> Image.Image:
    from beit3.pipelines import pipeline

    rows = _val_rows(index, "coco_captioning.val.jsonl")
    seen, picked = set(), []
    for row in rows:
        if row["image_path"] not in seen:
            seen.add(row["image_path"])
            picked.append(row)
        if len(picked) == EXAMPLES:
            break
    references = {r["image_path"]: r["text"] for r in _val_rows(index, "coco_retrieval.val.jsonl")}
    images = [_image(index, r) for r in picked]
    captions = {start: pipeline("captioning", runs / f"captioning_{start}" / "final")(images, num_beams=2, max_length=24)
                for start in ("pretrained", "scratch")}
    items = []
    for number, (image, row) in enumerate(zip(images, picked)):
        items.append((image, [(f"pretrained: {captions['pretrained'][number]['caption']}", SERIES_COLOURS[0]),
                              (f"scratch: {captions['scratch'][number]['caption']}", SERIES_COLOURS[1]),
                              (f"a reference: {references.get(row['image_path'], '?')}", INK)]))
    return captioned_grid(items)


def vqa_examples(runs: Path, index: Path) -> Image.Image:
    from beit3.pipelines import pipeline, read_label_names

    rows = _val_rows(index, "vqa.val.jsonl")[: EXAMPLES * 3 : 3]
    names = read_label_names(index / "answer2label.txt")
    answers = {}
    for start in ("pretrained", "scratch"):
        vqa = pipeline("vqa", runs / f"vqav2_{start}" / "final")
        answers[start] = [vqa(_image(index, r), r["text"], top_k=1)[0]["answer"] for r in rows]
    items = []
    for number, row in enumerate(rows):
        truth = names[row["labels"][max(range(len(row["scores"])), key=row["scores"].__getitem__)]] if row["labels"] else "?"
        lines = [(f"Q: {row['text']}", INK)]
        for start in ("pretrained", "scratch"):
            answer = answers[start][number]
            lines.append((f"{start}: {answer}", GOOD if answer == truth else BAD))
        lines.append((f"truth: {truth}", INK))
        items.append((_image(index, row), lines))
    return captioned_grid(items, lines=7)


@torch.no_grad()
def retrieval_examples(runs: Path, index: Path, queries: int = 6, k: int = 5) -> Image.Image:
    from beit3.pipelines import load_image_processor, load_tokenizer, text_length
    from beit3.models import Beit3ForImageTextRetrieval

    folder = runs / "retrieval_pretrained" / "final"
    model = Beit3ForImageTextRetrieval.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(folder)
    processor = load_image_processor(folder, spec_for_model(type(model)).image_mode, model.config.image_size)
    rows = _val_rows(index, "coco_retrieval.val.jsonl")
    paths = sorted({r["image_path"] for r in rows})
    images = [Image.open(index / p).convert("RGB") for p in paths]
    image_embeds = torch.cat([model.encode_image(processor(images[s:s + 64])["pixel_values"])
                              for s in range(0, len(images), 64)])
    picked = rows[:: max(1, len(rows) // queries)][:queries]
    encoded = tokenizer([r["text"] for r in picked], max_length=text_length(folder), padding="max_length",
                        truncation=True, return_tensors="pt")
    text_embeds = model.encode_text(encoded["input_ids"], encoded["attention_mask"])
    top = (text_embeds @ image_embeds.T).topk(min(k, len(images)), dim=-1).indices
    grid = []
    for row, hits in zip(picked, top.tolist()):
        grid.append((row["text"], [(images[h], paths[h] == row["image_path"]) for h in hits]))
    return retrieval_grid(grid)
