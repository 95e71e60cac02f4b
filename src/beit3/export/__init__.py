"""Exporting task models to ONNX and ``torch.export`` programs, and running exports with onnxruntime.

``beit3 export --model DIR --out EXPORT_DIR`` (or :func:`export_model`) writes a self-contained
folder; ``pipeline(task, EXPORT_DIR, backend="onnxruntime")``, ``beit3 predict ... --backend
onnxruntime`` and ``beit3 search ... --runtime onnxruntime`` run it (see docs/export.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["export_model", "load_runtime", "register"]

EXAMPLES = """examples:
  beit3 export --model runs/cap/final --out exports/cap
  beit3 export --model runs/vqa/final --out exports/vqa --quantize int8
  beit3 export --model runs/retrieval/final --out exports/retrieval --format torch-export

The folder is self-contained (graphs, manifest.json, config, tokenizer, image settings, labels):
  beit3 predict caption --model exports/cap --backend onnxruntime photo.jpg
  beit3 search index --model exports/retrieval --runtime onnxruntime --index photos.index photos/
"""


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from beit3.export.exporter import export_model

        return export_model
    if name == "load_runtime":
        from beit3.export.runtime import load_runtime

        return load_runtime
    raise AttributeError(name)


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "export", help=summary("export"),
        description="Export a fine-tuned model folder's inference graphs: ONNX (the dynamo exporter) and/or "
        "torch.export programs (.pt2), with dynamic batch and text length, into a self-contained folder that "
        "`beit3 predict --backend onnxruntime` and the pipelines run. Retrieval: image_encoder, text_encoder; "
        "VQA, classification, NLVR2: one graph of logits; captioning: caption_encoder (image + prompt -> "
        "first word and the key/value cache) and caption_decoder (one cached step).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model folder (save_pretrained, beit3 finetune) "
                        "or checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="the export folder to write")
    parser.add_argument("--format", choices=("onnx", "torch-export", "both"), default="both",
                        help="what to write (default: both)")
    parser.add_argument("--quantize", choices=("int8",), help="also write int8 dynamically quantized ONNX graphs")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer to ship (default: the model folder's, or its run's)")
    parser.add_argument("--no-optimize", action="store_true", help="skip the ONNX graph optimizer")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from beit3.export.exporter import export_model

    formats = ("onnx", "torch-export") if args.format == "both" else (args.format,)
    manifest = export_model(args.model, args.out, formats=formats, quantize=args.quantize, opset=args.opset,
                            tokenizer=args.tokenizer, optimize=not args.no_optimize)
    for name, entry in manifest["graphs"].items():
        files = ", ".join(entry[key] for key in ("onnx", "onnx_int8", "torch_export") if key in entry)
        print(f"{name}: {files}")
    print(f"wrote {args.out}/manifest.json ({manifest['architecture']}, {len(manifest['graphs'])} graphs)")
    return 0
