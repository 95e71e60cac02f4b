"""Inference speed of the base image encoder and of VQA, per runtime, beside timm's beit3_base.

One run, interleaved: every repeat times each variant once at each batch size, and the table
reports the median of the repeats, so the ratios compare calls made seconds apart.

* image embeddings/s: ``Beit3ForImageTextRetrieval.encode_image`` (backbone, vision head, unit
  vectors) against timm 1.0.31's ``beit3_base_patch16_224`` (``num_classes=0``: the pooled
  features), built by timm with random weights -- the same architecture, so the same work;
* VQA latency: ``Beit3ForVisualQuestionAnswering`` (image + ``--text-length`` tokens) per batch;
* variants: eager fp32, eager bf16 (autocast), ``torch.compile`` fp32, onnxruntime fp32 and int8
  (dynamic quantization), the last two from ``beit3 export``.

Each variant's output is compared with eager fp32 (largest absolute difference), so a fast but
wrong variant shows.

    .venv/bin/python benchmarks/inference.py                 # base, 224 px, batch 1 and 8 (~10 min on 2 cores)
    .venv/bin/python benchmarks/inference.py --preset tiny --image-size 32 --repeats 2   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from beit3.config import Beit3Config
from beit3.models import Beit3ForImageTextRetrieval, Beit3ForVisualQuestionAnswering

Run = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _timed(run: Run, inputs: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = run(inputs)
    return time.perf_counter() - start, out.float()


def _onnx_runs(model: torch.nn.Module, graph: str, names: list[str], folder: Path) -> dict[str, Run]:
    from beit3.export import export_model
    from beit3.export.runtime import ExportedGraphs

    start = time.perf_counter()
    export_model(model, folder, formats=["onnx"], quantize="int8")
    print(f"  exported {graph} (fp32 + int8) in {time.perf_counter() - start:.0f} s", flush=True)
    runs = {}
    for label, quantized in (("onnxruntime fp32", False), ("onnxruntime int8", True)):
        graphs = ExportedGraphs(folder, quantized=quantized, threads=torch.get_num_threads())
        runs[label] = (lambda g: lambda x: torch.from_numpy(g.run(graph, *[x[n] for n in names])[0]))(graphs)
    return runs


def _torch_runs(forward: Run, compile_: bool) -> dict[str, Run]:
    def bf16(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(inputs)

    runs = {"eager fp32": forward, "eager bf16": bf16}
    if compile_:
        runs["compiled fp32"] = torch.compile(forward, dynamic=False)
    return runs


def _measure(suite: str, runs: dict[str, Run], inputs: dict[int, dict[str, torch.Tensor]], repeats: int,
             unit: str) -> list[dict]:
    times: dict[tuple[str, int], list[float]] = {}
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    for repeat in range(repeats + 1):  # round 0 warms up (and compiles)
        for label, run in runs.items():
            for batch, x in inputs.items():
                seconds, out = _timed(run, x)
                if repeat:
                    times.setdefault((label, batch), []).append(seconds)
                outputs[(label, batch)] = out
        print(f"  {suite}: round {repeat} done", flush=True)
    rows = []
    for (label, batch), values in times.items():
        seconds = statistics.median(values)
        reference = outputs[("eager fp32", batch)]
        rows.append({"suite": suite, "variant": label, "batch": batch, "seconds": seconds,
                     "rate": batch / seconds, "unit": unit,
                     "max_abs_diff": float((outputs[(label, batch)] - reference).abs().max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (saves its compile time)")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset, image_size=args.image_size)
    generator = torch.Generator().manual_seed(0)
    images = {b: {"pixel_values": torch.randn(b, 3, args.image_size, args.image_size, generator=generator)}
              for b in args.batch_sizes}
    vqa_inputs = {b: {**images[b], "input_ids": torch.randint(3, config.vocab_size, (b, args.text_length),
                                                              generator=generator),
                      "attention_mask": torch.ones(b, args.text_length, dtype=torch.long)}
                  for b in args.batch_sizes}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        encoder = Beit3ForImageTextRetrieval(config).eval()
        runs = _torch_runs(lambda x: encoder.encode_image(x["pixel_values"]), not args.no_compile)
        runs.update(_onnx_runs(encoder, "image_encoder", ["pixel_values"], Path(scratch) / "retrieval"))
        if not args.no_timm and args.preset == "base":
            import timm

            reference = timm.create_model("beit3_base_patch16_224", pretrained=False, num_classes=0,
                                          img_size=args.image_size).eval()
            timm_runs = _torch_runs(lambda x: reference(x["pixel_values"]), compile_=False)
            runs.update({f"timm {label}": run for label, run in timm_runs.items()})
        encoder_rows = _measure("image embeddings", runs, images, args.repeats, "images/s")
        # timm's pooled features are not our projected unit vectors: no difference to report.
        for row in encoder_rows:
            if row["variant"].startswith("timm"):
                row["max_abs_diff"] = None
        rows += encoder_rows
        del runs  # frees the encoder and its compiled graph

        vqa = Beit3ForVisualQuestionAnswering(config, num_labels=3129).eval()
        runs = _torch_runs(lambda x: vqa(**x).logits, not args.no_compile)
        runs.update(_onnx_runs(vqa, "vqa", ["pixel_values", "input_ids", "attention_mask"], Path(scratch) / "vqa"))
        rows += _measure("VQA", runs, vqa_inputs, args.repeats, "questions/s")

    print(f"\n{args.preset}, {args.image_size} px, VQA text length {args.text_length}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} interleaved rounds")
    for suite in ("image embeddings", "VQA"):
        suite_rows = [r for r in rows if r["suite"] == suite]
        base = {r["batch"]: r["seconds"] for r in suite_rows if r["variant"] == "eager fp32"}
        print(f"\n| {suite} | " + " | ".join(f"batch {b} ms | {suite_rows[0]['unit']} | vs eager fp32"
                                              for b in args.batch_sizes) + " | max abs diff |")
        print("|---|" + "---|---|---|" * len(args.batch_sizes) + "---|")
        for variant in dict.fromkeys(r["variant"] for r in suite_rows):
            cells = []
            diffs = []
            for batch in args.batch_sizes:
                row = next(r for r in suite_rows if r["variant"] == variant and r["batch"] == batch)
                cells.append(f"{row['seconds'] * 1e3:.0f} | {row['rate']:.2f} | x{base[batch] / row['seconds']:.2f}")
                if row["max_abs_diff"] is not None:
                    diffs.append(row["max_abs_diff"])
            print(f"| {variant} | " + " | ".join(cells) + f" | {max(diffs):.2g} |" if diffs else
                  f"| {variant} | " + " | ".join(cells) + " | - |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
