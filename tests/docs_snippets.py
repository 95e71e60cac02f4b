"""Run every fenced Python block of README.md and docs/*.md, so the docs cannot drift from the API.

Used by tests/test_docs.py in a subprocess (a snippet may register a task or write files):

    python tests/docs_snippets.py WORLD_DIR RESULTS_JSON

The blocks of one document run in order, in one namespace (a page reads like a notebook), with
the working directory in a small world of stand-in files: tiny official-layout checkpoints under
the release's file names, model folders under the docs' ``runs/<name>/final`` paths, images, a
SentencePiece file named ``beit3.spm``, the small synthetic dataset. ``PREAMBLES`` gives a page
the variables its prose names but its snippets do not define (``pil_image``, ``texts`` ...).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> *)```py(?:thon)?[ \t]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)

IMAGE_NAMES = ("photo.jpg", "cat.jpg", "a.jpg", "b.jpg", "street.jpg", "left.jpg", "right.jpg", "query.jpg")

PREAMBLES: dict[str, str] = {
    "docs/processing.md": """
from PIL import Image
import io, numpy as np, torch
pil_image = Image.open("photo.jpg")
numpy_hwc = np.asarray(pil_image)
tensor_chw = torch.rand(3, 40, 40)
jpeg_bytes = open("a.jpg", "rb").read()
texts = ["a red circle", "two blue squares on the left"]
captions = texts
""",
    "docs/inference.md": """
from PIL import Image
import numpy as np
pil_image = Image.open("photo.jpg")
numpy_array = np.asarray(pil_image)
""",
    "docs/models.md": """
import torch
from beit3 import Beit3Config, Beit3Model
model = Beit3Model(Beit3Config.from_preset("tiny", num_layers=12, image_size=224, patch_size=16))
pixels = torch.rand(2, 3, 224, 224)
""",
    "docs/data.md": """
import torch
from beit3 import Beit3ImageProcessor, Beit3Processor, Beit3Tokenizer
processor = Beit3Processor(Beit3Tokenizer.from_pretrained("beit3.spm"), Beit3ImageProcessor(64, "vl"))
""",
}


def blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of each fenced python block, the indentation of the fence removed."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("code").splitlines())
        found.append((text[: match.start()].count("\n") + 1, code))
    return found


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[tuple[str, int]]:
    """Every block as (document relative to the repository, line)."""
    return [(str(doc.relative_to(ROOT)), line) for doc in documents() for line, _ in blocks(doc)]


# ------------------------------------------------------------------ the world of stand-in files
def build_world(world: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image

    from beit3.data.synthetic import generate
    from tests.tiny_pipelines import save_model_folder, tiny_tokenizer

    world.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i, name in enumerate(IMAGE_NAMES):
        pixels = (torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(world / name)
    (world / "photos").mkdir()
    for i in range(3):
        shutil.copy(world / IMAGE_NAMES[i], world / "photos" / f"holiday-{i}.jpg")

    tokenizer = tiny_tokenizer(world / "tokenizer-corpus")
    tokenizer.save_pretrained(world / "tokenizer")
    shutil.copy(world / "tokenizer" / "sentencepiece.model", world / "beit3.spm")

    runs = {"cap": "captioning", "vqa": "vqa", "imagenet": "classification", "nlvr2": "nlvr2",
            "retrieval": "retrieval", "coco_retrieval": "retrieval"}
    for run, kind in runs.items():
        save_model_folder(kind, tokenizer, world / "runs" / run / "final")
    labels = [f"class {i}" for i in range(4)]
    (world / "classes.txt").write_text("\n".join(labels) + "\n")

    _official_files(world, tokenizer.vocab_size)
    generate(world / "data" / "synthetic", size="small", seed=0)


def _official_files(world: Path, vocab_size: int) -> None:
    """Tiny checkpoints in the release's layout ({'model': {'beit3.<torchscale key>': ...}}) under the
    release's file names, written from torchscale's BEiT3 (the released backbone code)."""
    import torch

    from beit3.config import Beit3Config
    from beit3.models import Beit3ForImageClassification, Beit3ForVisualQuestionAnswering
    from tests.models.reference import torchscale_beit3

    backbone = torchscale_beit3(randomize=False, img_size=64, patch_size=16, vocab_size=vocab_size)
    base = {f"beit3.{k}": v.clone() for k, v in backbone.state_dict().items()}
    config = Beit3Config.from_preset("tiny", image_size=64, patch_size=16, vocab_size=vocab_size)

    def heads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if not k.startswith("beit3.")}

    files = {
        "beit3_base_patch16_224.pth": base,
        "beit3_base_patch16_480_vqa.pth": {**base, **heads(Beit3ForVisualQuestionAnswering(config, num_labels=10))},
        "beit3_base_patch16_224_in1k.pth": {**base, **heads(Beit3ForImageClassification(config, num_labels=10))},
    }
    (world / "checkpoints").mkdir()
    for name, state in files.items():
        torch.save({"model": state}, world / name)
        shutil.copy(world / name, world / "checkpoints" / name)


# ------------------------------------------------------------------ running
def run(world: Path, results_file: Path) -> None:
    import os

    os.chdir(world)
    results: dict[str, dict[str, object]] = {}
    for doc in documents():
        name = str(doc.relative_to(ROOT))
        found = blocks(doc)
        if not found:
            continue
        namespace: dict[str, object] = {"__name__": f"docs_{doc.stem}"}
        preamble = PREAMBLES.get(name)
        if preamble:
            exec(compile(preamble, f"<preamble of {name}>", "exec"), namespace)
        for line, code in found:
            start = time.perf_counter()
            try:
                exec(compile(code, f"{name}:{line}", "exec"), namespace)
                outcome = {"ok": True}
            except BaseException:  # noqa: BLE001 - every failure is reported to the test
                outcome = {"ok": False, "error": traceback.format_exc(limit=8)}
            outcome["seconds"] = round(time.perf_counter() - start, 2)
            results[f"{name}:{line}"] = outcome
    results_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    world_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    build_world(world_dir)
    run(world_dir, out)
