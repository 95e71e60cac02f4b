"""`beit3 predict detection|segmentation`: run a dense model on images and draw the result as PNG.

Registered under `beit3 predict` by :mod:`beit3.tasks.predict`."""
from __future__ import annotations

import argparse
import colorsys
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

EXAMPLES = """examples:
  beit3 predict detection --model runs/tiny_detection/final --out predictions data/synthetic/detection/val
  beit3 predict segmentation --model runs/tiny_segmentation/final --out seg photo.jpg photos/
  beit3 predict detection --model DIR --labels data/synthetic/detection/annotations/instances_val.json --out p imgs/
"""


def palette(count: int) -> list[tuple[int, int, int]]:
    """Distinct colours: evenly spaced hues (index 0 first)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(count, 1), 0.85, 1.0)) for i in range(count)]


def draw_detections(image: Image.Image, detection: dict[str, torch.Tensor], names: list[str],
                    threshold: float) -> Image.Image:
    """Boxes, labels with scores and translucent masks above ``threshold`` drawn on ``image``."""
    canvas = image.convert("RGBA")
    colours = palette(len(names) + 1)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    keep = detection["scores"] >= threshold
    for box, label, score, mask in zip(detection["boxes"][keep], detection["labels"][keep],
                                       detection["scores"][keep], detection["masks"][keep]):
        colour = colours[int(label)]
        layer = (mask[0].numpy() > 0.5).astype(np.uint8) * 110
        tint = Image.new("RGBA", canvas.size, colour + (0,))
        tint.putalpha(Image.fromarray(layer))
        overlay = Image.alpha_composite(overlay, tint)
        draw = ImageDraw.Draw(overlay)
        draw.rectangle(box.tolist(), outline=colour + (255,), width=1)
        draw.text((box[0].item() + 1, box[1].item()), f"{names[int(label) - 1]} {score:.2f}", fill=colour + (255,))
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def draw_segmentation(image: Image.Image, labels: np.ndarray, num_classes: int) -> Image.Image:
    """The image blended half-and-half with a colour per predicted class."""
    colours = np.array(palette(num_classes), dtype=np.uint8)
    painted = Image.fromarray(colours[labels]).resize(image.size, Image.NEAREST)
    return Image.blend(image.convert("RGB"), painted, 0.5)


def category_names(path: Path | None, count: int) -> list[str]:
    """Names from a COCO instances file or a text file (one per line); else "class k"."""
    if path is None:
        return [f"class {k}" for k in range(1, count + 1)]
    if path.suffix == ".json":
        categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in categories]
    else:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"{path} names {len(names)} classes, the model predicts {count}")
    return names


def _instance_class() -> type:
    from beit3.models import Beit3ForInstanceSegmentation

    return Beit3ForInstanceSegmentation


def add_dense(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict detection` and `beit3 predict segmentation` (one call per task)."""
    kind = spec.verb
    boxes = spec.model_class is _instance_class()
    what = "boxes, labels and masks" if boxes else "a colour per predicted class"
    parser = kinds.add_parser(
        kind, help=f"draw a {kind} model's predictions ({what}) on images as PNG",
        description=f"Load a {kind} model folder (from `beit3 finetune` or save_pretrained), run it on images "
        f"or folders of images, and write one PNG per image with the prediction drawn on it ({what}), "
        "plus predictions.json. Unreadable files are reported and skipped.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    parser.add_argument("--model", required=True, type=Path, help="model folder (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for PNGs and predictions.json")
    parser.add_argument("--labels", type=Path, help="class names: a COCO instances JSON or a text file, one per line")
    if boxes:
        parser.add_argument("--score-threshold", type=float, default=0.5, help="smallest score drawn")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--recursive", action="store_true",
                        help="also take the images in sub-folders of the folders named (default: only their own files)")
    parser.set_defaults(func=run_predict, task_name=spec.name)


def run_predict(args: argparse.Namespace) -> int:
    from beit3.catalogue import get_task
    from beit3.io import ensure_writable_dir
    from beit3.model_folder import check_model_kind
    from beit3.models import Beit3ForInstanceSegmentation, load_any_model
    from beit3.tasks.predict_io import InputReport, list_images, load_images, require_predictions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    ensure_writable_dir(args.out)  # a read-only or full --out fails before the model is loaded
    expected = get_task(args.task_name).model_class
    check_model_kind(args.model, expected, args.task_name,
                     lambda spec: f"use `beit3 predict {spec.verb}`" if spec.verb else f"it is for task {spec.name}")
    model = load_any_model(args.model).eval()
    if not isinstance(model, expected):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, not a {expected.__name__}")
    names = category_names(args.labels, model.num_labels)
    report = InputReport()
    paths = list_images(args.images, report, recursive=args.recursive)
    size = model.config.image_size
    records = []
    for chunk in load_images(paths, args.batch_size, report, f"predict {args.kind}"):
        originals = [image for _, image in chunk]
        pixels = torch.stack([torch.from_numpy(np.array(im.resize((size, size), Image.BILINEAR))).permute(2, 0, 1)
                              for im in originals]).float() / 255
        with torch.no_grad():
            if isinstance(model, Beit3ForInstanceSegmentation):
                results = model(pixels).detections
            else:
                results = model((pixels - 0.5) / 0.5).logits.argmax(1).numpy()
        for (path, image), result in zip(chunk, results):
            resized = image.resize((size, size), Image.BILINEAR)
            if isinstance(model, Beit3ForInstanceSegmentation):
                drawn = draw_detections(resized, result, names, args.score_threshold).resize(image.size)
                keep = result["scores"] >= args.score_threshold
                records.append({"image": str(path), "detections": [
                    {"label": names[int(label) - 1], "score": round(float(score), 4),
                     "box_xyxy": [round(v * image.width / size if i % 2 == 0 else v * image.height / size, 2)
                                  for i, v in enumerate(box.tolist())]}
                    for box, label, score in zip(result["boxes"][keep], result["labels"][keep], result["scores"][keep])]})
            else:
                drawn = draw_segmentation(image, result.astype(np.int64), model.num_labels)
                counts = np.bincount(result.ravel(), minlength=model.num_labels)
                records.append({"image": str(path), "pixel_fraction": {str(k): round(c / result.size, 4)
                                                                      for k, c in enumerate(counts) if c}})
            drawn.save(args.out / f"{path.stem}.png")
    require_predictions(records, report)
    (args.out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    skipped = f", skipped {len(report.skipped)} (see above)" if report.skipped else ""
    print(f"wrote {len(records)} PNGs and predictions.json to {args.out}{skipped}")
    return 0
