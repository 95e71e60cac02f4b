"""`beit3 demo`: the default job.

For now a short end-to-end smoke run: build a tiny BEiT-3, run every task model once on random
inputs (forward, loss, backward), decode a caption with the KV cache, and print shapes and timings.
"""
from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the default job (a smoke run of every task model on a tiny BEiT-3)",
        description="Build a tiny BEiT-3 and run each task model once on random inputs, printing shapes "
        "and timings. Needs no data and no downloads.",
        epilog="example:\n  beit3 demo --preset tiny --batch-size 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, base, large, giant)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from beit3.config import Beit3Config
    from beit3.models import TASK_MODELS, count_parameters

    torch.manual_seed(args.seed)
    config = Beit3Config.from_preset(args.preset)
    batch, size, length = args.batch_size, config.image_size, 16
    images = torch.randn(batch, 3, size, size)
    ids = torch.randint(3, config.vocab_size, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length // 2:] = 0
    task_inputs = {
        "classification": dict(pixel_values=images, labels=torch.randint(0, 10, (batch,))),
        "vqav2": dict(pixel_values=images, input_ids=ids, attention_mask=attention_mask,
                      labels=torch.rand(batch, 20).round()),
        "nlvr2": dict(pixel_values=torch.stack([images, images.flip(0)], 1), input_ids=ids,
                      attention_mask=attention_mask, labels=torch.randint(0, 2, (batch,))),
        "retrieval": dict(pixel_values=images, input_ids=ids, attention_mask=attention_mask),
        "captioning": dict(pixel_values=images, input_ids=ids, attention_mask=attention_mask, labels=ids,
                           masked_positions=torch.rand(batch, length) < 0.5),
    }
    head_args = {"classification": {"num_labels": 10}, "vqav2": {"num_labels": 20},
                 "captioning": {"mask_token_id": config.vocab_size - 1}}
    print(f"BEiT-3 '{args.preset}': {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.image_size}px images, batch {batch}")
    print(f"{'task':<15}{'parameters':>12}  {'output':<22}{'loss':>9}{'fwd+bwd ms':>12}")
    for task, cls in TASK_MODELS.items():
        model = cls(config, **head_args.get(task, {}))
        start = time.perf_counter()
        out = model(**task_inputs[task])
        out.loss.backward()
        elapsed = (time.perf_counter() - start) * 1000
        shape = getattr(out, "logits", None)
        shape = tuple(shape.shape) if shape is not None else tuple(out.logits_per_image.shape)
        print(f"{task:<15}{count_parameters(model):>12,}  {str(shape):<22}{out.loss.item():>9.4f}{elapsed:>12.1f}")
        if task == "captioning":
            model.eval()
            start = time.perf_counter()
            tokens = model.generate(images, num_beams=3, max_length=12)
            print(f"{'  generate':<15}{'':>12}  {str(tuple(tokens.shape)):<22}{'':>9}"
                  f"{(time.perf_counter() - start) * 1000:>12.1f}")
    print("demo finished: every task model ran forward, loss and backward.")
    return 0
