"""Captioning decoding speed with the key/value cache versus recomputing the prefix, in tokens/s.

Beam search (3 beams) on a randomly initialised captioner; EOS is suppressed so that both runs
decode exactly ``max_length`` tokens per caption. The two runs must produce the same tokens.

    .venv/bin/python benchmarks/caption_decoding.py [--preset base] [--image-size 224] [--max-length 20]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from beit3.config import Beit3Config
from beit3.models import Beit3ForCaptioning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset, image_size=args.image_size)
    model = Beit3ForCaptioning(config, mask_token_id=config.vocab_size - 1).eval()
    with torch.no_grad():
        model.mlm_head.bias[model.eos_token_id] = -1e4  # decode the full length in both runs
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    generated = args.batch_size * (args.max_length - 2)  # words per caption, BOS and EOS excluded
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for repeat in range(args.repeats + 1):  # the first round warms up; then interleaved, best of each
        for use_cache in (True, False):
            start = time.perf_counter()
            tokens[use_cache] = model.generate(images, num_beams=args.beams, max_length=args.max_length,
                                               use_cache=use_cache)
            if repeat:
                times[use_cache].append(time.perf_counter() - start)
    results = {"with cache": generated / min(times[True]), "without cache": generated / min(times[False])}
    assert torch.equal(tokens[True], tokens[False]), "cached and recomputed decoding differ"
    for name, rate in results.items():
        print(f"{name:<14} {rate:7.2f} tokens/s")
    print(f"speed-up x{results['with cache'] / results['without cache']:.2f} "
          f"({args.preset}, {args.image_size}px, batch {args.batch_size}, {args.beams} beams, {args.max_length} tokens)")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
