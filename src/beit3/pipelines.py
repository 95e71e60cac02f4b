"""Inference for people: ``pipeline(task, model_dir)`` -> a callable from images and text to answers.

.. code-block:: python

    from beit3.pipelines import pipeline

    captioner = pipeline("captioning", "runs/cap/final")
    captioner("photo.jpg")                          # {"caption": "a dog on a beach"}
    vqa = pipeline("vqa", "runs/vqa/final")
    vqa(["a.jpg", "b.jpg"], "what colour is the car?", top_k=3)   # one list of answers per image

A pipeline finds everything it needs from the model folder: the weights (``save_pretrained`` or
a training checkpoint), the tokenizer and image settings (saved in the folder, else from the
``run.yaml`` training wrote beside it) and the label names (``labels.txt`` in the folder, else the
run's ``answer2label.txt`` / ``imagenet.classes.txt`` under ``data.root``). Images are paths, PIL
images, arrays or tensors; one input gives one result, a list gives a list. Results are plain
dicts of strings, floats and booleans.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import torch

from beit3.catalogue import TaskSpec, get_task, iter_tasks, spec_for_model
from beit3.model_folder import (
    CAPTION_DEFAULTS,
    TokenizerInput,
    caption_settings,
    check_model_kind,
    find_run_config,
    load_image_processor,
    model_kind,
    resolve_tokenizer,
    run_setting,
    text_length,
)
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3PreTrainedModel,
)
from beit3.processing import Beit3ImageProcessor, Beit3Processor, Beit3Tokenizer
from beit3.processing.image import ImageInput

ModelInput = Union[str, os.PathLike, Beit3PreTrainedModel]
__all__ = ["Pipeline", "CaptioningPipeline", "VQAPipeline", "ClassificationPipeline", "VisualReasoningPipeline",
           "ZeroShotPipeline", "pipeline", "find_run_config", "load_tokenizer", "read_label_names"]

LABELS_FILENAME = "labels.txt"
"""Label names saved with a classification or VQA model: line i names label i."""

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
)
"""Zero-shot prompts, CLIP style: each class name is put in every template and the text
embeddings are averaged, which is steadier than any single phrasing."""


# ------------------------------------------------------------------ finding what a model folder needs
def load_tokenizer(model_dir: Path | None, given: TokenizerInput = None) -> Beit3Tokenizer:
    """``given``, else the model folder's tokenizer, else its training run's (:func:`resolve_tokenizer`)."""
    return resolve_tokenizer(given, model_dir)


def read_label_names(path: str | os.PathLike) -> list[str]:
    """Names by label id from a text file (line i names label i) or an ``answer2label.txt``
    (one ``{"answer": ..., "label": ...}`` object a line, as ``beit3 data build vqav2`` writes)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or not lines[0].startswith("{"):
        return lines
    from beit3.data.builders import read_answer2label

    answer2label = read_answer2label(path)
    names = [""] * len(answer2label)
    for answer, label in answer2label.items():
        if not 0 <= label < len(names) or names[label]:
            raise ValueError(f"{path}: labels must be 0..{len(names) - 1}, each once; label {label} is not")
        names[label] = answer
    return names


def resolve_label_names(model_dir: Path | None, count: int, given: Sequence[str] | str | os.PathLike | None,
                        run_file: str) -> tuple[list[str], str | None]:
    """(names of the ``count`` labels, where they came from; None when none was found).

    Looked for in order: ``given`` (a list or a file), ``labels.txt`` / ``run_file`` in the model
    folder, ``run_file`` under the training run's ``data.root``. Without any, labels are named by
    their number.
    """
    if given is not None and not isinstance(given, (str, os.PathLike)):
        names, source = list(given), "the labels given"
    else:
        files = [Path(given)] if given is not None else []
        if given is None and model_dir is not None and model_dir.is_dir():
            files += [model_dir / LABELS_FILENAME, model_dir / run_file]
            run = find_run_config(model_dir)
            root = run_setting(run, "data", "root")
            option = run_setting(run, "task", "options", "answer2label") if run_file == "answer2label.txt" else None
            if root:
                files.append(Path(root) / (option or run_file))
        found = next((f for f in files if f.is_file()), None)
        if given is not None and found is None:
            raise FileNotFoundError(f"label file not found: {given}")
        if found is None:
            return [str(k) for k in range(count)], None
        names, source = read_label_names(found), str(found)
    if len(names) != count:
        raise ValueError(f"{source} names {len(names)} labels but the model predicts {count}; "
                         "pass the label file the model was trained with")
    return names, source


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU. Anything else must name a
    device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``); otherwise a ``ValueError``
    says in one line what is available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["cpu"] + ([f"cuda (cuda:0..cuda:{torch.cuda.device_count() - 1})"] if torch.cuda.is_available() else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        available.append("mps")
    choices = f"use auto or one of: {', '.join(available)}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; {choices}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {resolved} asked for, but PyTorch sees no CUDA GPU on this machine; {choices}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {resolved} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s); {choices}")
    elif resolved.type == "mps":
        if "mps" not in available:
            raise ValueError(f"device {resolved} asked for, but PyTorch has no MPS (Apple GPU) here; {choices}")
    elif resolved.type != "cpu":
        raise ValueError(f"device {resolved} is not supported here; {choices}")
    return resolved


def _run_instead(spec: TaskSpec) -> str:
    return f"use the '{spec.name}' pipeline (`beit3 predict {spec.verb}`)" if spec.verb else f"use task {spec.name}"


def load_model(model: ModelInput, cls: type[Beit3PreTrainedModel], name: str) -> Beit3PreTrainedModel:
    """``model`` as an instance of ``cls``, with an error that names the right task when it is another head."""
    if getattr(model, "runtime", None) == "onnxruntime":  # an export's runner (beit3.export.runtime)
        return model.check_task(cls, name)
    if isinstance(model, Beit3PreTrainedModel):
        if not isinstance(model, cls):
            kind, spec = model_kind(type(model).__name__)
            hint = f": {_run_instead(spec)}" if spec is not None else ""
            raise ValueError(f"the model given is {kind} ({type(model).__name__}); task {name} needs "
                             f"{cls.__name__}{hint}")
        return model
    path = Path(model)
    if path.is_dir():
        check_model_kind(path, cls, name, _run_instead)
    return cls.from_pretrained(path)


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")


def _check_texts(texts: Sequence[str], what: str) -> None:
    """Refuse empty (or blank) questions and statements: the model would answer nothing asked."""
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise ValueError(f"{what} {number} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"{what} {number} is empty; ask something (e.g. 'what colour is the car?')"
                             if what == "question" else f"{what} {number} is empty; give the sentence to judge")


# ------------------------------------------------------------------ pipelines
def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _is_batch(images: Any) -> bool:
    """A list or tuple is a batch, and so is a 4-D array or tensor; anything else is one image."""
    return isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)


class Pipeline:
    """What every task pipeline shares: the model on its device, the image processor, the
    tokenizer (None for image-only models), batching, saving.

    Build one with :func:`pipeline` or ``<Pipeline>.from_pretrained(model_dir)``.
    """

    model_class: ClassVar[type[Beit3PreTrainedModel]]
    """The model it runs; its task in the catalogue gives the name and the image pipeline."""
    needs_tokenizer: ClassVar[bool] = True

    def __init__(self, model: Beit3PreTrainedModel, image_processor: Beit3ImageProcessor,
                 tokenizer: Beit3Tokenizer | None = None, *, max_length: int = 64, batch_size: int = 8,
                 device: str | torch.device | None = None) -> None:
        if self.needs_tokenizer and tokenizer is None:
            raise ValueError(f"the {type(self).__name__} needs a tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = load_model(model, self.model_class, self.spec().name).to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def spec(cls) -> TaskSpec:
        return spec_for_model(cls.model_class)

    @classmethod
    def from_pretrained(cls, model: ModelInput, *, tokenizer: TokenizerInput = None, batch_size: int = 8,
                        device: str | torch.device | None = None, backend: str = "torch",
                        **options: Any) -> "Pipeline":
        """Load the model and what goes with it from a model folder (see the module docstring).
        ``backend="onnxruntime"``: ``model`` is an export folder (``beit3 export``), run by onnxruntime."""
        device = resolve_device(device)  # before loading: a device this machine lacks fails at once
        model_dir = Path(model) if not isinstance(model, Beit3PreTrainedModel) else None
        spec = cls.spec()
        if backend == "torch":
            instance = load_model(model, cls.model_class, spec.name)
        else:
            from beit3.export.runtime import load_runtime

            instance = load_runtime(model, backend, cls.model_class, spec.name)
        return cls(instance, load_image_processor(model_dir, spec.image_mode, instance.config.image_size),
                   load_tokenizer(model_dir, tokenizer) if cls.needs_tokenizer else None,
                   max_length=text_length(model_dir), batch_size=batch_size, device=device,
                   **cls._options_from_folder(model_dir, instance, options))

    @classmethod
    def _options_from_folder(cls, model_dir: Path | None, model: Beit3PreTrainedModel,
                             options: dict[str, Any]) -> dict[str, Any]:
        """Task-specific constructor options (label names) read from the model folder."""
        return options

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a self-contained folder: model, tokenizer, image and text settings (and label names)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is None:
            self.image_processor.save_pretrained(directory)
        else:
            Beit3Processor(self.tokenizer, self.image_processor, self.max_length).save_pretrained(directory)
        return directory

    def _pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self.image_processor(list(images))["pixel_values"].to(self.device)

    def _text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}


class _LabelledPipeline(Pipeline):
    """A pipeline whose model scores a fixed list of labels (answers, classes)."""

    label_file: ClassVar[str]

    def __init__(self, model: Beit3PreTrainedModel, image_processor: Beit3ImageProcessor,
                 tokenizer: Beit3Tokenizer | None = None, *, labels: Sequence[str] | None = None,
                 labels_source: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, image_processor, tokenizer, **kwargs)
        count = self.model.num_labels
        self.labels = list(labels) if labels is not None else [str(k) for k in range(count)]
        if len(self.labels) != count:
            raise ValueError(f"{len(self.labels)} label names given, the model predicts {count}")
        # Where the names came from (a file, "the labels given"); None when labels are numbers.
        self.labels_source = (labels_source or "the labels given") if labels is not None else None

    @classmethod
    def _options_from_folder(cls, model_dir, model, options):
        given = options.pop("labels", None)
        names, source = resolve_label_names(model_dir, model.num_labels, given, cls.label_file)
        return {**options, "labels": names if source else None, "labels_source": source}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = super().save_pretrained(directory)
        (directory / LABELS_FILENAME).write_text("".join(name + "\n" for name in self.labels), encoding="utf-8")
        return directory

    def _top_k(self, probabilities: torch.Tensor, top_k: int, key: str) -> list[list[dict[str, Any]]]:
        _check_top_k(top_k)
        scores, indices = probabilities.float().topk(min(top_k, probabilities.shape[-1]), dim=-1)
        return [[{key: self.labels[i], "score": s} for s, i in zip(row_scores, row_indices)]
                for row_scores, row_indices in zip(scores.tolist(), indices.tolist())]


class CaptioningPipeline(Pipeline):
    """image(s) -> ``{"caption": str}``, by beam search with the key/value cache.

    The beam settings (``num_beams``, ``max_length``, ``length_penalty``, ``min_length``) default
    to the model's training run (what ``beit3 evaluate`` decodes with), else the release's; a call
    may override each. The ``<mask>`` id that decoding needs comes from the tokenizer
    (``mask_token_id=`` overrides it).
    """

    model_class = Beit3ForCaptioning

    def __init__(self, model: Beit3PreTrainedModel, image_processor: Beit3ImageProcessor,
                 tokenizer: Beit3Tokenizer | None = None, *, generation: dict[str, Any] | None = None,
                 mask_token_id: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, image_processor, tokenizer, **kwargs)
        unknown = set(generation or {}) - set(CAPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; known: {sorted(CAPTION_DEFAULTS)}")
        self.generation = {**CAPTION_DEFAULTS, **(generation or {})}
        if mask_token_id is None:
            mask_token_id = self.tokenizer.mask_token_id if self.tokenizer is not None else self.model.mask_token_id
        vocab = self.model.config.vocab_size
        if mask_token_id is None or not 0 <= int(mask_token_id) < vocab:
            raise ValueError(f"mask token id {mask_token_id} is outside the model's vocabulary ({vocab} rows): pass "
                             "the tokenizer the model was trained with, or mask_token_id= (--mask-token-id N)")
        self.mask_token_id = int(mask_token_id)

    @classmethod
    def _options_from_folder(cls, model_dir, model, options):
        return {**options, "generation": {**caption_settings(model_dir), **(options.get("generation") or {})}}

    @torch.no_grad()
    def __call__(self, images: ImageInput | list[ImageInput], *, num_beams: int | None = None,
                 max_length: int | None = None, length_penalty: float | None = None,
                 min_length: int | None = None) -> dict[str, str] | list[dict[str, str]]:
        given = {"num_beams": num_beams, "max_length": max_length, "length_penalty": length_penalty,
                 "min_length": min_length}
        settings = {**self.generation, **{k: v for k, v in given.items() if v is not None}}
        if min_length is None:  # the run's default never exceeds a shorter max_length asked for
            settings["min_length"] = min(settings["min_length"], settings["max_length"])
        batch = list(images) if _is_batch(images) else [images]
        results = []
        for chunk in _batched(batch, self.batch_size):
            ids = self.model.generate(self._pixels(chunk), mask_token_id=self.mask_token_id, **settings)
            results += [{"caption": text} for text in self.tokenizer.batch_decode(ids.cpu())]
        return results if _is_batch(images) else results[0]


class VQAPipeline(_LabelledPipeline):
    """image(s) + question(s) -> the ``top_k`` answers ``[{"answer", "score"}]``, best first.

    ``score`` is the sigmoid of the answer's logit: the model is trained with binary
    cross-entropy against soft scores, so each answer gets its own probability (they need not
    sum to 1). One question is asked of every image; a list pairs questions with images.
    """

    model_class = Beit3ForVisualQuestionAnswering
    label_file = "answer2label.txt"

    @torch.no_grad()
    def __call__(self, images: ImageInput | list[ImageInput], questions: str | list[str], *,
                 top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        batch = list(images) if _is_batch(images) else [images]
        asked = [questions] * len(batch) if isinstance(questions, str) else list(questions)
        if len(asked) != len(batch):
            raise ValueError(f"{len(batch)} images but {len(asked)} questions: give one question, or one per image")
        _check_texts(asked, "question")
        _check_top_k(top_k)
        results = []
        for chunk in _batched(list(zip(batch, asked)), self.batch_size):
            pictures, texts = zip(*chunk)
            logits = self.model(self._pixels(pictures), **self._text(texts)).logits
            results += self._top_k(logits.float().sigmoid(), top_k, "answer")
        return results if _is_batch(images) else results[0]


class ClassificationPipeline(_LabelledPipeline):
    """image(s) -> the ``top_k`` classes ``[{"label", "score"}]`` (softmax probabilities), best first."""

    model_class = Beit3ForImageClassification
    needs_tokenizer = False
    label_file = "imagenet.classes.txt"

    @torch.no_grad()
    def __call__(self, images: ImageInput | list[ImageInput], *,
                 top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        _check_top_k(top_k)
        batch = list(images) if _is_batch(images) else [images]
        results = []
        for chunk in _batched(batch, self.batch_size):
            logits = self.model(self._pixels(chunk)).logits
            results += self._top_k(logits.float().softmax(-1), top_k, "label")
        return results if _is_batch(images) else results[0]


class VisualReasoningPipeline(Pipeline):
    """(left, right) image pair(s) + statement(s) -> ``{"true": bool, "probability": P(true)}``.

    One statement and one pair give one result; a list of pairs and a list of statements (or
    one statement for all) give a list.
    """

    model_class = Beit3ForVisualReasoning

    @torch.no_grad()
    def __call__(self, pairs: tuple[ImageInput, ImageInput] | list[tuple[ImageInput, ImageInput]],
                 statements: str | list[str]) -> dict[str, Any] | list[dict[str, Any]]:
        single = isinstance(statements, str) and isinstance(pairs, tuple)
        batch = [pairs] if single else list(pairs)
        said = [statements] * len(batch) if isinstance(statements, str) else list(statements)
        if len(said) != len(batch):
            raise ValueError(f"{len(batch)} image pairs but {len(said)} statements")
        if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in batch):
            raise ValueError("image pairs must be (left, right) tuples")
        _check_texts(said, "statement")
        results = []
        for chunk in _batched(list(zip(batch, said)), self.batch_size):
            chunk_pairs, texts = zip(*chunk)
            pixels = self._pixels([image for pair in chunk_pairs for image in pair])
            pixels = pixels.view(len(chunk_pairs), 2, *pixels.shape[1:])  # (B, 2, 3, S, S)
            logits = self.model(pixels, **self._text(texts)).logits
            results += [{"true": p >= 0.5, "probability": p} for p in logits.float().softmax(-1)[:, 1].tolist()]
        return results[0] if single else results


class ZeroShotPipeline(Pipeline):
    """image(s) -> the ``top_k`` of ``classes`` ``[{"label", "score"}]``, with the retrieval dual encoder.

    Each class name (underscores read as spaces) is put into every prompt template; the
    normalised text embeddings of its prompts are averaged and normalised again (CLIP's prompt
    ensembling). Scores are the softmax over classes of the model's scaled cosine similarities.
    """

    model_class = Beit3ForImageTextRetrieval

    def __init__(self, model: Beit3PreTrainedModel, image_processor: Beit3ImageProcessor,
                 tokenizer: Beit3Tokenizer | None = None, *, classes: Sequence[str] | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, **kwargs: Any) -> None:
        super().__init__(model, image_processor, tokenizer, **kwargs)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"prompt templates must each hold '{{}}' where the class name goes; got {bad or 'none'}")
        self.templates = list(templates)
        self.classes: list[str] = []
        self.class_embeds: torch.Tensor | None = None
        if classes is not None:
            self.set_classes(classes)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Encode the candidate classes once; later calls score images against them."""
        names = [name.replace("_", " ").strip() for name in classes]
        if not names or not all(names):
            raise ValueError("zero-shot classification needs at least one non-empty class name")
        self.classes = names
        self.class_embeds = self.class_embeddings(names)

    @torch.no_grad()
    def class_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(C, D): per class, the mean of its normalised prompt embeddings, normalised again."""
        prompts = [template.format(name) for name in names for template in self.templates]
        embeds = torch.cat([self.model.encode_text(**self._text(chunk)) for chunk in _batched(prompts, 64)])
        embeds = embeds.float().view(len(names), len(self.templates), -1).mean(dim=1)  # (C, D)
        return torch.nn.functional.normalize(embeds, dim=-1)

    @torch.no_grad()
    def __call__(self, images: ImageInput | list[ImageInput], classes: Sequence[str] | None = None, *,
                 top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if classes is not None:
            self.set_classes(classes)
        if self.class_embeds is None:
            raise ValueError("no classes to choose from: pass classes=[...] (here or when building the pipeline)")
        _check_top_k(top_k)
        batch = list(images) if _is_batch(images) else [images]
        scale = self.model.logit_scale.exp().float()
        results = []
        for chunk in _batched(batch, self.batch_size):
            image_embeds = self.model.encode_image(self._pixels(chunk)).float()
            probabilities = (scale * image_embeds @ self.class_embeds.t()).softmax(-1)  # (B, C)
            scores, indices = probabilities.topk(min(top_k, len(self.classes)), dim=-1)
            results += [[{"label": self.classes[i], "score": s} for s, i in zip(row_s, row_i)]
                        for row_s, row_i in zip(scores.tolist(), indices.tolist())]
        return results if _is_batch(images) else results[0]


def pipeline(task: str, model: ModelInput, *, tokenizer: TokenizerInput = None, batch_size: int = 8,
             device: str | torch.device | None = None, **options: Any) -> Pipeline:
    """A ready pipeline for ``task`` from a model folder (or a model instance with ``tokenizer=``).

    task: a task of the catalogue that has a pipeline, by its name, an alias or its ``beit3 predict``
        verb: ``captioning`` / ``caption``, ``vqav2`` / ``vqa``, ``classification`` / ``classify`` /
        ``imagenet``, ``nlvr2`` / ``visual-reasoning``, ``zero-shot`` / ``retrieval``.
    options: ``labels`` (vqa, classification: a list or a file of names), ``classes`` and
        ``templates`` (zero-shot), ``backend="onnxruntime"`` (``model`` is an export folder of
        ``beit3 export``; see docs/export.md).
    """
    try:
        spec = get_task(task)
    except KeyError:
        spec = None
    if spec is None or spec.pipeline is None:
        known = ", ".join(sorted(n for s in iter_tasks(having="pipeline") for n in s.names))
        raise ValueError(f"unknown pipeline task {task!r}; expected one of {known}")
    return spec.pipeline_class().from_pretrained(model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                                 **options)
