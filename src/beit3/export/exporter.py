"""``export_model``: a task model -> a self-contained folder of ONNX and ``torch.export`` graphs.

The folder holds, besides the graphs, everything inference needs and nothing of the training
world: ``manifest.json`` (the graphs, their inputs and outputs, the preprocessing),
``config.json`` (the model's), the tokenizer and image processor files, ``labels.txt`` (VQA,
classification) and, for captioning, the beam search settings (``run.yaml`` with only those).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from beit3.export.graphs import EXPORT_BATCH, GraphSpec, dynamic_shapes, graph_specs

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "beit3-export"
MANIFEST_VERSION = 1
FORMATS = ("onnx", "torch-export")
QUANTIZE = ("int8",)


def _describe_shapes(program: torch.export.ExportedProgram, spec: GraphSpec) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as ``{"name", "dtype", "shape"}``, dynamic sizes by their dimension's name
    (e.g. ``"past + 2"``), read from the traced program."""
    symbols: dict[str, str] = {}
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    user_inputs = [p for p in placeholders if p.name in set(program.graph_signature.user_inputs)]
    for node, name in zip(user_inputs, spec.inputs):
        for axis, dim in spec.dynamic.get(name, {}).items():
            symbols[str(node.meta["val"].shape[axis])] = dim

    def shape_of(value: Any) -> list[int | str]:
        sizes = []
        for size in value.shape:
            if isinstance(size, int):
                sizes.append(size)
            else:
                text = str(size)
                sizes.append(re.sub(r"\b[su]\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), text))
        return sizes

    inputs = [{"name": name, "dtype": str(node.meta["val"].dtype).replace("torch.", ""),
               "shape": shape_of(node.meta["val"])} for node, name in zip(user_inputs, spec.inputs)]
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    values = output_node.args[0]
    values = values if isinstance(values, (tuple, list)) else [values]
    outputs = [{"name": name, "dtype": str(v.meta["val"].dtype).replace("torch.", ""), "shape": shape_of(v.meta["val"])}
               for name, v in zip(spec.outputs, values)]
    return inputs, outputs


def _save_preprocessing(model: Any, model_dir: Path | None, out: Path, tokenizer: Any) -> dict[str, Any]:
    """Write the tokenizer, image processor, labels and decoding settings into ``out``; return what
    the manifest says about them."""
    from beit3.catalogue import spec_for_model
    from beit3.model_folder import caption_settings, load_image_processor, resolve_tokenizer, text_length
    from beit3.models import Beit3ForCaptioning, Beit3ForImageClassification
    from beit3.processing import Beit3Processor

    task = spec_for_model(type(model))
    image_processor = load_image_processor(model_dir, task.image_mode, model.config.image_size)
    max_length = text_length(model_dir)
    found = None
    if not isinstance(model, Beit3ForImageClassification):
        try:
            found = resolve_tokenizer(tokenizer, model_dir)
        except FileNotFoundError:
            if isinstance(model, Beit3ForCaptioning) and model.mask_token_id is None:
                raise
    if found is not None:
        written = Beit3Processor(found, image_processor, max_length).save_pretrained(out)
    else:
        written = [image_processor.save_pretrained(out)]
    info: dict[str, Any] = {"task": task.name, "image_mode": task.image_mode, "image_size": model.config.image_size,
                            "max_length": max_length, "tokenizer": found is not None,
                            "files": sorted(Path(p).name for p in written)}
    if hasattr(model, "num_labels"):
        from beit3.pipelines import LABELS_FILENAME, resolve_label_names

        label_file = "imagenet.classes.txt" if isinstance(model, Beit3ForImageClassification) else "answer2label.txt"
        names, source = resolve_label_names(model_dir, model.num_labels, None, label_file)
        if source is not None:
            (out / LABELS_FILENAME).write_text("".join(name + "\n" for name in names), encoding="utf-8")
            info["files"].append(LABELS_FILENAME)
        info["labels"] = source is not None
    if isinstance(model, Beit3ForCaptioning):
        settings = caption_settings(model_dir)
        info["generation"] = settings
        options = {"num_beams": settings["num_beams"], "length_penalty": settings["length_penalty"],
                   "max_decode_len": settings["max_length"], "min_decode_len": settings["min_length"]}
        (out / "run.yaml").write_text("# beam search settings of the exported model (beit3 export)\n"
                                      + "task:\n  name: " + task.name + "\n  options:\n"
                                      + "".join(f"    {k}: {v}\n" for k, v in options.items()), encoding="utf-8")
        info["files"].append("run.yaml")
    return info


def export_model(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = FORMATS,
    quantize: str | None = None,
    opset: int | None = None,
    tokenizer: Any = None,
    optimize: bool = True,
    text_length: int = 8,
) -> dict[str, Any]:
    """Export a task model's inference graphs into ``out_dir`` and return the manifest.

    model: a model folder (or checkpoint) path, or a model instance (then its preprocessing is
        the default for its task, and ``tokenizer=`` gives the tokenizer to ship).
    formats: ``"onnx"`` (the dynamo exporter, ``<graph>.onnx``) and/or ``"torch-export"``
        (``<graph>.pt2``, for ``torch.export.load``).
    quantize: ``"int8"`` also writes ``<graph>.int8.onnx`` (onnxruntime dynamic quantization:
        int8 weights, activations quantized per call).
    opset: the ONNX opset (default: the exporter's).
    optimize: run the ONNX optimizer of ``onnxscript`` on each graph (constant folding, fusions).
    text_length: the text length the graphs are traced at; any length up to the model's runs.
    """
    from beit3.models import Beit3PreTrainedModel
    from beit3.models.base import load_any_model

    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {sorted(unknown) or 'none'}; choose from {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE)}")
    if quantize is not None and "onnx" not in formats:
        raise ValueError("--quantize int8 quantizes the ONNX graphs: add the onnx format")
    model_dir = None
    source: dict[str, Any] = {"path": None, "sha256": None}
    if not isinstance(model, Beit3PreTrainedModel):
        path = Path(model)
        model_dir = path if path.is_dir() else None
        from beit3.tasks.search import fingerprint_model

        identity = fingerprint_model(path)
        source = {"path": identity.path, "sha256": identity.sha256}
        model = load_any_model(path)
    model = model.eval()
    specs = graph_specs(model, text_length)  # refuses a model without an export (a backbone, dense heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(model.config_json(), encoding="utf-8")
    preprocessing = _save_preprocessing(model, model_dir, out, tokenizer)

    config = model.config
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "architecture": type(model).__name__,
        "torch_version": torch.__version__, "source": source, "export_batch": EXPORT_BATCH,
        "model": {"num_layers": config.num_layers, "num_heads": config.num_heads, "head_dim": config.head_dim,
                  "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                  "image_size": config.image_size, "patch_size": config.patch_size,
                  "num_image_tokens": (config.image_size // config.patch_size) ** 2 + 1,
                  "max_text_length": config.max_text_length, **model.head_args()},
        "preprocessing": preprocessing, "graphs": {},
    }
    if hasattr(model, "logit_scale"):
        manifest["model"]["logit_scale"] = float(model.logit_scale.detach())
    for spec in specs:
        manifest["graphs"][spec.name] = _export_graph(spec, model, out, formats, quantize, opset, optimize)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _export_graph(spec: GraphSpec, model: Any, out: Path, formats: Sequence[str], quantize: str | None,
                  opset: int | None, optimize: bool) -> dict[str, Any]:
    spec.module.eval()
    with torch.no_grad():
        program = torch.export.export(spec.module, spec.args(), dynamic_shapes=dynamic_shapes(spec, model))
    inputs, outputs = _describe_shapes(program, spec)
    entry: dict[str, Any] = {"description": spec.description, "inputs": inputs, "outputs": outputs}
    if "torch-export" in formats:
        torch.export.save(program, out / f"{spec.name}.pt2")
        entry["torch_export"] = f"{spec.name}.pt2"
    if "onnx" in formats:
        options: dict[str, Any] = {"dynamo": True, "input_names": list(spec.inputs), "output_names": spec.outputs,
                                   "optimize": optimize, "verbose": False}
        if opset is not None:
            options["opset_version"] = opset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on shared dimension names
            onnx_program = torch.onnx.export(program, **options)
        onnx_program.save(str(out / f"{spec.name}.onnx"))
        entry["onnx"] = f"{spec.name}.onnx"
        entry["opset"] = _opset_of(out / entry["onnx"])
        if quantize == "int8":
            _quantize_int8(out / entry["onnx"], out / f"{spec.name}.int8.onnx")
            entry["onnx_int8"] = f"{spec.name}.int8.onnx"
    return entry


def _quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: the weights of MatMul/Gemm stored as int8, activations
    quantized on the fly. The exporter's intermediate shape annotations are dropped first: the
    quantizer re-infers shapes and refuses any it disagrees with."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    del proto.graph.value_info[:]
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its pre-processing hint
    quantize_dynamic(proto, target, weight_type=QuantType.QInt8)


def _opset_of(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
