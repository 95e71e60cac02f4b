"""Samples/s of the data pipeline on the built-in synthetic world (raw decoding, no model).

Generates the medium synthetic world in a temporary folder, then times: one tar-shard pair stream
read in-process, the same with 2 data-loader workers, the VQA index dataset with 2 workers, and
the pretraining MixingLoader (images + texts + pairs, 1:1:1) with 2 workers.

    .venv/bin/python benchmarks/data_loading.py [--size small|medium] [--samples 3000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from beit3.data import MixingLoader, SampleStream, TarShards, TextFiles, VQADataset
from beit3.data.synthetic.world import generate


def rate(iterable, samples: int, count=len) -> float:
    iterator = iter(iterable)
    next(iterator)  # start-up (worker launch, first shard) is not throughput
    seen, start = 0, time.perf_counter()
    while seen < samples:
        seen += count(next(iterator))
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        start = time.perf_counter()
        generate(root, size=args.size)
        print(f"generated the {args.size} synthetic world in {time.perf_counter() - start:.1f} s")
        pre = root / "pretrain"
        results = {}

        def pairs():
            return SampleStream(TarShards(str(pre / "pairs")), fields=("image", "text"), infinite=True)

        results["tar pairs, in-process"] = rate(pairs(), args.samples, count=lambda _: 1)
        loader = torch.utils.data.DataLoader(pairs(), batch_size=32, num_workers=2, collate_fn=list)
        results["tar pairs, 2 workers"] = rate(loader, args.samples)
        index = sorted((root / "index").glob("vqa.train*.jsonl"))
        vqa = VQADataset([str(p) for p in index])
        loader = torch.utils.data.DataLoader(vqa, batch_size=32, shuffle=True, num_workers=2, collate_fn=list)
        results["VQA index, 2 workers"] = rate(loader, min(args.samples, len(vqa) - 64))
        streams = {
            "images": SampleStream(TarShards(str(pre / "images")), fields=("image",), infinite=True),
            "texts": SampleStream(TextFiles(str(pre / "texts.txt")), fields=("text",), infinite=True),
            "pairs": pairs(),
        }
        mixing = MixingLoader(streams, batch_size=96, num_workers=2)
        results["MixingLoader 1:1:1, 2 workers"] = rate(mixing, args.samples,
                                                        count=lambda batch: sum(len(v) for v in batch.values()))
    for name, value in results.items():
        print(f"{name:<32} {value:8.0f} samples/s")
    print(json.dumps({k: round(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
