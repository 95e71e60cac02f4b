"""Images/s per core of the image processor: JPEG decoding + each task's pipeline.

Decodes real 224x224 JPEG bytes (smooth random scenes made here, quality 90) and runs the
training and evaluation pipelines of the three official families, on one thread, so that the
figure is per data-loader worker (one core).

    .venv/bin/python benchmarks/image_processing.py
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from beit3.processing import Beit3ImageProcessor


def jpeg_corpus(count: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def images_per_second(processor: Beit3ImageProcessor, corpus: list[bytes], repeats: int) -> float:
    for data in corpus[:4]:
        processor.preprocess(data)
    start = time.perf_counter()
    for _ in range(repeats):
        for data in corpus:
            processor.preprocess(data)
    return repeats * len(corpus) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = jpeg_corpus(args.images, args.size)
    rows = []
    for task in ("vqav2", "retrieval", "classification"):
        for train in (True, False):
            processor = Beit3ImageProcessor.for_task(task, args.size, train=train)
            rate = images_per_second(processor, corpus, args.repeats)
            rows.append(dict(task=task, train=train, images_per_s_per_core=round(rate, 1)))
            print(f"{task:<15} {'train' if train else 'eval':<6} {rate:8.1f} images/s per core")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
