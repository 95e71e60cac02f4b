"""Load test of `beit3 serve`: latency and throughput with dynamic batching on and off.

    .venv/bin/python benchmarks/serve_load.py [--requests 160] [--seconds 20] [--image-size 96]

Saves a tiny image classifier (random weights: speed only) in a temporary folder, starts
`beit3 serve` on a free loopback port in a subprocess, twice (batching on: --max-batch 32; off:
--max-batch 1), and at concurrency 1, 8 and 32 posts a PNG to /classify until --requests are
answered or --seconds have passed. Prints a Markdown table of p50 / p99 latency and requests per
second, and the server's resident memory (RSS) before and after each run.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_classifier(folder: Path, image_size: int) -> Path:
    import torch

    from beit3.config import Beit3Config
    from beit3.models import Beit3ForImageClassification

    torch.manual_seed(0)
    config = Beit3Config.from_preset("tiny", image_size=image_size, patch_size=8)
    Beit3ForImageClassification(config, num_labels=10).save_pretrained(folder)
    return folder


def start_server(model: Path, port: int, max_batch: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "beit3.cli", "serve", "--model", str(model), "--port", str(port),
               "--device", "cpu", "--max-batch", str(max_batch), "--max-wait-ms", "5", "--queue-size", "256"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server stopped: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 60 s")


async def load(url: str, picture: bytes, concurrency: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    issued = 0

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal issued, failures
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            start = time.perf_counter()
            response = await client.post(url, files={"image": ("p.png", picture, "image/png")})
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await client.post(url, files={"image": ("p.png", picture, "image/png")})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "failures": failures, "rps": len(latencies) / elapsed,
            "p50": 1000 * latencies[len(latencies) // 2], "p99": 1000 * latencies[min(len(latencies) - 1,
                                                                                       int(0.99 * len(latencies)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=160, help="requests per run (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20, help="time limit per run (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96, help="the model's input size (default: %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buffer, "PNG")
    picture = buffer.getvalue()
    rows, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = save_classifier(Path(tmp) / "classifier", args.image_size)
        for mode, max_batch in (("on (--max-batch 32)", 32), ("off (--max-batch 1)", 1)):
            port = free_port()
            server = start_server(model, port, max_batch)
            try:
                before = rss_mb(server.pid)
                for concurrency in (1, 8, 32):
                    result = asyncio.run(load(f"http://127.0.0.1:{port}/classify", picture, concurrency,
                                              args.requests, args.seconds))
                    rows.append((mode, concurrency, result))
                    print(f"batching {mode}, concurrency {concurrency}: {result}", file=sys.stderr)
                batches = httpx.get(f"http://127.0.0.1:{port}/metrics").json()["models"]["classify"]["batch_sizes"]
                memory.append((mode, before, rss_mb(server.pid), batches))
            finally:
                server.terminate()
                server.wait(10)
    print("| batching | concurrency | requests | p50 ms | p99 ms | requests/s |\n|---|---:|---:|---:|---:|---:|")
    for mode, concurrency, r in rows:
        print(f"| {mode} | {concurrency} | {r['requests']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.1f} |"
              + (f" ({r['failures']} failed)" if r["failures"] else ""))
    print("\n| batching | RSS before MB | RSS after MB | batch sizes (size: calls) |\n|---|---:|---:|---|")
    for mode, before, after, batches in memory:
        print(f"| {mode} | {before:.0f} | {after:.0f} | {', '.join(f'{k}: {v}' for k, v in batches.items())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
