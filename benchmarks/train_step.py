"""Time one training step (forward + backward) of BEiT-3 base against torchscale's BEiT3.

Workload (the issue's): base model, one 224x224 image + 64 text tokens per sample, batch 4,
joint image-text forward, backward of a scalar loss. Both models hold the same weights. Steps of
the two models are interleaved so that machine noise hits both alike; the ratio is taken from the
medians of one run. Achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) is reported
against the measured throughput of a large matmul in the same dtype.

    .venv/bin/python benchmarks/train_step.py                 # fp32 and bf16
    .venv/bin/python benchmarks/train_step.py --dtype bf16 --steps 5 --profile
    .venv/bin/python benchmarks/train_step.py --compile --preset tiny   # + our model compiled vs eager
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from beit3.config import Beit3Config
from beit3.models import Beit3Model

warnings.filterwarnings("ignore")


def reference_model(preset: str = "base"):
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    c = Beit3Config.from_preset(preset)
    config = EncoderConfig(encoder_layers=c.num_layers, encoder_embed_dim=c.hidden_size,
                           encoder_attention_heads=c.num_heads, encoder_ffn_embed_dim=c.intermediate_size,
                           img_size=c.image_size, patch_size=c.patch_size, vocab_size=c.vocab_size,
                           multiway=True, no_output_layer=True, drop_path_rate=0.0)
    return BEiT3(config)


def ours_from(reference, tmp: Path, preset: str = "base") -> Beit3Model:
    state = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"model": state}, tmp)
    loaded = Beit3Model.from_pretrained(tmp)
    heads = Beit3Config.from_preset(preset).num_heads  # the weights do not tell the head count
    if loaded.config.num_heads == heads:
        return loaded
    model = Beit3Model(loaded.config.replace(num_heads=heads))
    model.load_state_dict(loaded.state_dict())
    return model


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def make_steps(ours, reference, batch: int, text_len: int, dtype):
    size = ours.config.image_size
    images = torch.randn(batch, 3, size, size)
    ids = torch.randint(3, ours.config.vocab_size - 10, (batch, text_len))
    attention_mask = torch.ones(batch, text_len, dtype=torch.long)
    padding = attention_mask == 0

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def ours_step():
        with autocast():
            out = ours(images, ids, attention_mask).last_hidden_state
        out.float().square().mean().backward()
        for p in ours.parameters():
            p.grad = None

    def reference_step():
        with autocast():
            out = reference(textual_tokens=ids, visual_tokens=images, text_padding_position=padding)["encoder_out"]
        out.float().square().mean().backward()
        for p in reference.parameters():
            p.grad = None

    return ours_step, reference_step


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each of our blocks as the engine's train.compile does")
    parser.add_argument("--preset", default="base", help="model size of both (tiny: 32 px, 2 blocks)")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = reference_model(args.preset).train()
    ours = ours_from(reference, Path("/tmp/beit3_bench_reference.pth"), args.preset).train()
    wanted = Beit3Config.from_preset(args.preset)
    assert all(getattr(ours.config, k) == getattr(wanted, k) for k in
               ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "image_size"))
    eager = None
    if args.compile:  # the same weights once more, uncompiled: the compile speed-up within one run
        from beit3.training.distributed import apply_compile, find_blocks

        eager = ours_from(reference, Path("/tmp/beit3_bench_reference.pth"), args.preset).train()
        apply_compile(find_blocks(ours, None))
    results = []
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        ours_step, reference_step = make_steps(ours, reference, args.batch_size, args.text_len, dtype)
        flops = count_flops(ours_step)
        start = time.perf_counter()
        ours_step(), reference_step()  # warm-up (and compilation)
        warmup_s = time.perf_counter() - start
        ours_times, reference_times, eager_times = [], [], []
        timed = [(ours_step, ours_times), (reference_step, reference_times)]
        if eager is not None:
            eager_step, _ = make_steps(eager, reference, args.batch_size, args.text_len, dtype)
            eager_step()
            timed.append((eager_step, eager_times))
        for _ in range(args.steps):
            for step, times in timed:
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        ours_s, reference_s = statistics.median(ours_times), statistics.median(reference_times)
        peak = matmul_peak(torch.float32 if dtype == "fp32" else torch.bfloat16)
        row = dict(dtype=dtype, ours_s=ours_s, torchscale_s=reference_s, speedup=reference_s / ours_s,
                   step_gflop=flops / 1e9, ours_gflops=flops / ours_s / 1e9,
                   torchscale_gflops=flops / reference_s / 1e9, matmul_peak_gflops=peak)
        if eager is not None:
            row.update(eager_s=statistics.median(eager_times), compile_speedup=statistics.median(eager_times) / ours_s,
                       warmup_s=warmup_s)
            print(f"{dtype}: compiled {ours_s:.3f} s/step vs eager {row['eager_s']:.3f}: x{row['compile_speedup']:.2f} "
                  f"(first step with compilation {warmup_s:.1f} s)")
        results.append(row)
        print(f"{dtype}: ours {ours_s:.3f} s/step, torchscale {reference_s:.3f} s/step, speed-up x{row['speedup']:.2f}; "
              f"{row['step_gflop']:.0f} GFLOP/step -> ours {row['ours_gflops']:.0f} GFLOP/s, torchscale "
              f"{row['torchscale_gflops']:.0f} GFLOP/s, matmul peak {peak:.0f} GFLOP/s "
              f"({100 * row['ours_gflops'] / peak:.0f}% vs {100 * row['torchscale_gflops'] / peak:.0f}%)")
        if args.profile:
            for name, step in (("ours", ours_step), ("torchscale", reference_step)):
                with torch.profiler.profile() as prof:
                    step()
                print(f"--- {name} {dtype}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, commit=commit, preset=args.preset, compiled=args.compile, batch=args.batch_size, text_len=args.text_len, steps=args.steps)
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
