"""Run an export folder with onnxruntime, behind the call surface of the PyTorch task models.

``load_runtime(export_dir)`` gives an object the pipelines and ``beit3 search`` use in place of
the model: ``forward`` (VQA, NLVR2, classification: an output with ``.logits``),
``encode_image`` / ``encode_text`` / ``logit_scale`` (retrieval), ``generate`` (captioning: the
model's own beam search, each step one onnxruntime call of the decoder graph). Tensors go in and
come out as ``torch.Tensor``; the graphs run on onnxruntime's CPU provider (its CUDA provider
when the device asked for is a GPU and that provider is installed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from beit3.export.exporter import MANIFEST, MANIFEST_FORMAT

BACKENDS = ("torch", "onnxruntime")


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of an export folder, with an error that says what to run when absent."""
    path = Path(export_dir)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"'{path}' is not an export folder ({MANIFEST} is missing): make one with "
                                f"`beit3 export --model MODEL_DIR --out {path}`")
    manifest = json.loads(file.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} is not a beit3 export manifest")
    return manifest


def exported_sha256(path: str | os.PathLike) -> str | None:
    """The fingerprint of the model an export folder was made from (None for anything else), so an
    image index built with the PyTorch model can be queried through its export and back."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("source", {}).get("sha256")
    except (json.JSONDecodeError, AttributeError):
        return None


class ExportedGraphs:
    """The onnxruntime sessions of an export folder, opened on first use."""

    def __init__(self, export_dir: str | os.PathLike, *, quantized: bool = False, threads: int | None = None):
        self.directory = Path(export_dir)
        self.manifest = read_manifest(self.directory)
        self.quantized = quantized
        self.threads = threads
        self.providers = ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}

    def use_device(self, device: torch.device) -> None:
        import onnxruntime

        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self._sessions.clear()

    def session(self, name: str) -> Any:
        if name not in self._sessions:
            try:
                import onnxruntime
            except ImportError:
                raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'beit3[export]'") from None
            entry = self.manifest["graphs"].get(name)
            key = "onnx_int8" if self.quantized else "onnx"
            if entry is None or key not in entry:
                what = "an int8 ONNX graph (export with --quantize int8)" if self.quantized else "an ONNX graph"
                raise FileNotFoundError(f"export folder '{self.directory}' has no {what} named {name}")
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: not its notes on nodes it cannot constant-fold
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._sessions[name] = onnxruntime.InferenceSession(str(self.directory / entry[key]), options,
                                                                providers=self.providers)
        return self._sessions[name]

    def run(self, name: str, *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Run graph ``name`` on its inputs in the manifest's order."""
        session = self.session(name)
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"graph {name} takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        feed = {}
        for input_name, value in zip(names, inputs):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feed[input_name] = np.ascontiguousarray(array)
        return session.run(None, feed)


class OnnxRuntimeModel:
    """What every runner shares: the config, ``to``/``eval`` (no-ops but for the device), the task check."""

    architecture: str = ""
    runtime = "onnxruntime"

    def __init__(self, export_dir: str | os.PathLike, *, quantized: bool = False, threads: int | None = None):
        from beit3.config import Beit3Config

        self.graphs = ExportedGraphs(export_dir, quantized=quantized, threads=threads)
        self.manifest = self.graphs.manifest
        saved = json.loads((self.graphs.directory / "config.json").read_text(encoding="utf-8"))
        self.config = Beit3Config.from_dict(saved["config"])
        self.head = dict(saved.get("head", {}))
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "OnnxRuntimeModel":
        self.device = torch.device(device)
        self.graphs.use_device(self.device)
        return self

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def check_task(self, cls: type, task: str) -> "OnnxRuntimeModel":
        if cls.__name__ != self.architecture:
            raise ValueError(f"export folder {self.graphs.directory} holds a {self.architecture}; task {task} "
                             f"needs {cls.__name__}")
        return self

    def save_pretrained(self, directory: Any) -> None:
        raise ValueError("an onnxruntime model has no weights to save: export the PyTorch model folder again")

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


def _ones_like_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)


class OrtImageTextRetrieval(OnnxRuntimeModel):
    """``encode_image`` / ``encode_text`` / ``logit_scale`` of :class:`Beit3ForImageTextRetrieval`."""

    architecture = "Beit3ForImageTextRetrieval"

    def __init__(self, export_dir: str | os.PathLike, **options: Any):
        super().__init__(export_dir, **options)
        self.logit_scale = torch.tensor(float(self.manifest["model"]["logit_scale"]))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.graphs.run("image_encoder", pixel_values.float())[0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.long()
        return self._tensor(self.graphs.run("text_encoder", ids, _ones_like_ids(ids, attention_mask))[0])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> Any:
        from beit3.models.outputs import RetrievalOutput

        image_embeds, text_embeds = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.exp()
        logits = scale * image_embeds @ text_embeds.t()
        return RetrievalOutput(image_embeds=image_embeds, text_embeds=text_embeds, logits_per_image=logits,
                               logits_per_text=logits.t(), logit_scale=scale)


class OrtImageClassification(OnnxRuntimeModel):
    """``forward(pixel_values).logits`` of :class:`Beit3ForImageClassification`."""

    architecture = "Beit3ForImageClassification"
    graph = "classification"

    @property
    def num_labels(self) -> int:
        return int(self.manifest["model"]["num_labels"])

    def forward(self, pixel_values: torch.Tensor) -> Any:
        from beit3.models.outputs import ClassifierOutput

        return ClassifierOutput(logits=self._tensor(self.graphs.run(self.graph, pixel_values.float())[0]))


class OrtVisualQuestionAnswering(OrtImageClassification):
    """``forward(pixel_values, input_ids, attention_mask).logits`` of :class:`Beit3ForVisualQuestionAnswering`."""

    architecture = "Beit3ForVisualQuestionAnswering"
    graph = "vqa"

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,  # type: ignore[override]
                attention_mask: torch.Tensor | None = None) -> Any:
        from beit3.models.outputs import ClassifierOutput

        ids = input_ids.long()
        logits = self.graphs.run(self.graph, pixel_values.float(), ids, _ones_like_ids(ids, attention_mask))[0]
        return ClassifierOutput(logits=self._tensor(logits))


class OrtVisualReasoning(OrtVisualQuestionAnswering):
    """``forward(pixel_values (B, 2, C, H, W), input_ids, attention_mask).logits`` of :class:`Beit3ForVisualReasoning`."""

    architecture = "Beit3ForVisualReasoning"
    graph = "nlvr2"

    @property
    def num_labels(self) -> int:
        return 2


class _CaptionSteps:
    """Stands in for the backbone inside :meth:`Beit3ForCaptioning.generate`: the first call (with
    the image) runs the encoder graph, each later one the decoder graph on the cache. What it
    returns as ``last_hidden_state`` is already the log-probabilities at the [MASK] slot."""

    def __init__(self, runner: "OrtCaptioning"):
        self.runner = runner

    def __call__(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, attn_mask: torch.Tensor | None = None,
                 past_key_values: Any = None, use_cache: bool = False, text_position_offset: int = 0) -> Any:
        from beit3.layers import KVCache

        runner = self.runner
        if pixel_values is not None:
            outputs = runner.graphs.run("caption_encoder", pixel_values.float(), input_ids.long())
        else:
            num_image = runner.manifest["model"]["num_image_tokens"]
            if text_position_offset != past_key_values.length - num_image:
                raise ValueError(f"the decoder graph takes its text position from the cache: offset "
                                 f"{text_position_offset} for a cache of {past_key_values.length} tokens")
            past = [t for kv in past_key_values.layers for t in kv]
            outputs = runner.graphs.run("caption_decoder", input_ids.long(), *past)
        tensors = [runner._tensor(array) for array in outputs]
        layers = [(tensors[1 + 2 * i], tensors[2 + 2 * i]) for i in range((len(tensors) - 1) // 2)]
        return SimpleNamespace(last_hidden_state=tensors[0], past_key_values=KVCache(layers, joint=True))


class OrtCaptioning(OnnxRuntimeModel):
    """``generate`` of :class:`Beit3ForCaptioning`: the same beam search code, each step a graph call."""

    architecture = "Beit3ForCaptioning"

    def __init__(self, export_dir: str | os.PathLike, **options: Any):
        super().__init__(export_dir, **options)
        model = self.manifest["model"]
        self.bos_token_id, self.pad_token_id = model["bos_token_id"], model["pad_token_id"]
        self.eos_token_id, self.mask_token_id = model["eos_token_id"], model["mask_token_id"]
        self.beit3 = _CaptionSteps(self)

    @staticmethod
    def _next_word_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs  # the graphs return log-probabilities already

    def decode_step(self, words: torch.Tensor, cache: Any, mask_token_id: int,
                    num_image: int) -> tuple[torch.Tensor, Any]:
        """As :meth:`Beit3ForCaptioning.decode_step`: the newest words (N,) and the cache -> the
        next-word log-probabilities (N, V) and the cache with the words added (one decoder call)."""
        step_ids = torch.stack([words, torch.full_like(words, mask_token_id)], 1)
        out = self.beit3(input_ids=step_ids, past_key_values=cache, use_cache=True,
                         text_position_offset=cache.length - num_image)
        return out.last_hidden_state, out.past_key_values.truncate(cache.length + 1)

    def generate(self, pixel_values: torch.Tensor, num_beams: int = 3, max_length: int = 32,
                 length_penalty: float = 0.6, use_cache: bool = True, min_length: int = 3,
                 mask_token_id: int | None = None) -> torch.Tensor:
        """As :meth:`Beit3ForCaptioning.generate` (``use_cache`` is always on: the graphs are the cached steps)."""
        from beit3.models import Beit3ForCaptioning

        return Beit3ForCaptioning.generate(self, pixel_values, num_beams=num_beams, max_length=max_length,
                                           length_penalty=length_penalty, use_cache=True, min_length=min_length,
                                           mask_token_id=mask_token_id)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("the captioning export runs decoding only (generate); training needs the PyTorch model")


RUNNERS = {cls.architecture: cls for cls in (OrtImageTextRetrieval, OrtImageClassification, OrtVisualQuestionAnswering,
                                             OrtVisualReasoning, OrtCaptioning)}


def load_runtime(export_dir: str | os.PathLike, backend: str = "onnxruntime", model_class: type | None = None,
                 task: str | None = None, *, quantized: bool = False, threads: int | None = None) -> OnnxRuntimeModel:
    """The runner of an export folder (``backend="onnxruntime"``), checked against ``model_class`` when given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "torch":
        raise ValueError("load_runtime runs export folders with onnxruntime; load a PyTorch model with from_pretrained")
    if not isinstance(export_dir, (str, os.PathLike)):
        if isinstance(export_dir, OnnxRuntimeModel):
            runner = export_dir
        else:
            raise ValueError(f"backend onnxruntime needs an export folder (`beit3 export`), got a {type(export_dir).__name__}")
    else:
        manifest = read_manifest(export_dir)
        runner_class = RUNNERS.get(manifest["architecture"])
        if runner_class is None:
            raise ValueError(f"no onnxruntime runner for a {manifest['architecture']}")
        runner = runner_class(export_dir, quantized=quantized, threads=threads)
    if model_class is not None:
        runner.check_task(model_class, task or model_class.__name__)
    return runner
