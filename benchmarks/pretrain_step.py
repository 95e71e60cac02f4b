"""Model-FLOPs utilisation of one masked-data-modeling pretraining step (forward + backward).

One step of `Beit3ForPreTraining` on the three streams of the paper's batch: images (40% of
patches block-masked, visual-token targets), texts (15% masked) and image-text pairs (50% of the
text masked). FLOPs are counted by torch's FlopCounterMode on the step itself; utilisation is
achieved FLOP/s over the measured throughput of a large matmul of the same dtype on the same
device (on a GPU, also over the nominal dense bf16 peak when given with --peak-tflops).

    .venv/bin/python benchmarks/pretrain_step.py                       # CPU, base, fp32 + bf16
    python benchmarks/pretrain_step.py --device cuda --per-stream 32 --dtype bf16 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from beit3.config import Beit3Config
from beit3.models import Beit3ForPreTraining
from beit3.pretraining import BlockMaskingGenerator, mask_text_tokens


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, size: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_batch(config: Beit3Config, per_stream: int, text_len: int, device: str) -> dict[str, torch.Tensor]:
    grid, vocab = config.grid_size, config.vocab_size
    masks = BlockMaskingGenerator((grid, grid), num_masking_patches=int(0.4 * grid * grid))
    ids = torch.randint(3, vocab - 10, (per_stream, text_len))
    ids[:, 0], ids[:, -1] = 0, 2
    attention = torch.ones_like(ids)
    text_ids, text_labels = mask_text_tokens(ids, attention, 0.15, mask_token_id=vocab - 9, vocab_size=vocab - 10,
                                             special_ids=(0, 1, 2))
    pair_ids, pair_labels = mask_text_tokens(ids, attention, 0.5, mask_token_id=vocab - 9, vocab_size=vocab - 10,
                                             special_ids=(0, 1, 2))
    size = config.image_size
    batch = dict(
        image_pixel_values=torch.randn(per_stream, 3, size, size), image_mask=masks(per_stream, 0),
        image_labels=torch.randint(0, 8192, (per_stream, grid * grid)),
        text_input_ids=text_ids, text_attention_mask=attention, text_labels=text_labels,
        pair_pixel_values=torch.randn(per_stream, 3, size, size), pair_input_ids=pair_ids,
        pair_attention_mask=attention, pair_labels=pair_labels,
    )
    return {k: v.to(device) for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--per-stream", type=int, default=2, help="samples per stream (images, texts, pairs)")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--peak-tflops", type=float, help="nominal dense peak of the device, for MFU")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset)
    model = Beit3ForPreTraining(config).to(args.device).train()
    if args.compile:
        for block in model.beit3.layers:
            block.compile()
    batch = make_batch(config, args.per_stream, args.text_len, args.device)
    rows = []
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        def step():
            context = torch.autocast(args.device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
            with context:
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up (and compilation)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.steps):
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        peak = matmul_peak(torch.float32 if dtype == "fp32" else torch.bfloat16, args.device)
        row = dict(device=args.device, dtype=dtype, preset=args.preset, samples=3 * args.per_stream,
                   step_s=round(seconds, 3), step_gflop=round(flops / 1e9, 1),
                   achieved_tflops=round(flops / seconds / 1e12, 3), matmul_peak_tflops=round(peak / 1e12, 3),
                   utilisation_vs_matmul=round(flops / seconds / peak, 3))
        if args.peak_tflops:
            row["mfu_vs_nominal"] = round(flops / seconds / (args.peak_tflops * 1e12), 3)
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
