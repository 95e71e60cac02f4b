"""Start-up of pretraining data over many small shards: what one process spends before its first sample.

    python benchmarks/shard_startup.py --shards 1000 --samples 100 [--out startup.json]

Writes ``--shards`` tar shards of ``--samples`` (tiny JPEG + caption) samples each in a scratch folder,
then times, each in a fresh interpreter so no cache of this one helps:

* ``headers``: listing every sample of every shard (what every rank did before the shard index);
* ``index_first``: the first start with the index (counts the shards once and writes beit3_shards.json);
* ``index``: a later start (reads the index, ``stat`` per shard), as every other rank and run does;
* ``streamed``: the streamed path, which reads only the validation samples at the head of the first shard.

Prints one JSON record with the seconds of each (after the imports) and the ratio of ``headers``
to ``index``.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

IMPORTS = ("from beit3.data import TarShards; from beit3.data.streams import ShardRefs, head_refs; "
           "from beit3.pretraining.data import collect_refs")
PROBES = {
    "headers": "len(collect_refs(TarShards(SPEC)))",
    "index_first": "len(ShardRefs(TarShards(SPEC)))",
    "index": "len(ShardRefs(TarShards(SPEC)))",
    "streamed": "len(head_refs(TarShards(SPEC), 64)[0])",
}
"""What each start does, timed after the imports (torch's import alone is seconds)."""


def write_shards(folder: Path, shards: int, samples: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 30, 160)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as tar:
            for n in range(samples):
                for extension, data in (("jpg", jpeg), ("txt", f"caption {shard} {n}".encode())):
                    info = tarfile.TarInfo(f"{shard * samples + n:09d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def probe(name: str, spec: str) -> tuple[float, int]:
    code = (f"import json, time; {IMPORTS}; SPEC = {spec!r}; start = time.perf_counter(); n = {PROBES[name]}; "
            "print(json.dumps([time.perf_counter() - start, n]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, count = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", help="also write the record to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_shards(folder, args.shards, args.samples)
        spec = str(folder / "*.tar")
        record: dict = {"shards": args.shards, "samples_per_shard": args.samples}
        for name in ("headers", "index_first", "index", "streamed"):
            seconds, count = probe(name, spec)
            record[f"{name}_s"] = round(seconds, 4)
            record[f"{name}_samples"] = count
        record["headers_over_index"] = round(record["headers_s"] / record["index_s"], 1)
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
