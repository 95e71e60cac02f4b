"""Which bf16 attention kernel is faster on this CPU: two bf16 matmuls around a float32 softmax
(``matmul``) or PyTorch's ``scaled_dot_product_attention`` (``sdpa``), forward + backward.

The shape is the base model's training step of benchmarks/train_step.py (batch 4, 12 heads of 64,
261 tokens: a 224 px image and 64 text tokens), 12 layers' worth per timing; interleaved, median.
It prints the setting to use (``BEIT3_CPU_BF16_ATTENTION``) and what this machine picks by default.

    .venv/bin/python benchmarks/attention_kernels.py [--batch 4 --heads 12 --tokens 261 --repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from beit3.layers.attention import CPU_BF16_ATTENTION, _bf16_cpu_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=261)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    mask = torch.ones(args.batch, 1, args.tokens, args.tokens, dtype=torch.bool)
    mask[1:, ..., args.tokens - 8:] = False  # padded text in all rows but the first
    kernels = {
        "matmul bf16": (torch.bfloat16, lambda q, k, v: _bf16_cpu_attention(q, k, v, mask)),
        "sdpa bf16": (torch.bfloat16, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "sdpa fp32": (torch.float32, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    }
    inputs = {dtype: [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
              for dtype in (torch.bfloat16, torch.float32)}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for repeat in range(args.repeats + 1):
        for name, (dtype, kernel) in kernels.items():
            q, k, v = inputs[dtype]
            start = time.perf_counter()
            for _ in range(args.layers):
                kernel(q, k, v).float().sum().backward()
            if repeat:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {args.batch}, {args.heads} heads of {args.head_dim}, {args.tokens} tokens, {args.layers} layers, "
          f"forward + backward, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {getattr(torch._C._cpu, '_init_amx', lambda: False)()}")
    for name, seconds in median.items():
        print(f"  {name:<12} {seconds * 1e3:8.1f} ms")
    best = "matmul" if median["matmul bf16"] < median["sdpa bf16"] else "sdpa"
    ratio = max(median["matmul bf16"], median["sdpa bf16"]) / min(median["matmul bf16"], median["sdpa bf16"])
    print(f"faster in bf16 here: {best} (x{ratio:.2f}); this machine's default: {CPU_BF16_ATTENTION}"
          + ("" if best == CPU_BF16_ATTENTION else f" -> set BEIT3_CPU_BF16_ATTENTION={best}"))


if __name__ == "__main__":
    main()
