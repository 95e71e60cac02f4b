"""The pipelines, `beit3 predict` and `beit3 search` on an export folder with onnxruntime give the
PyTorch model's answers; `beit3 export` writes a folder."""
from __future__ import annotations

import json

import pytest
import torch

from beit3.cli import main
from beit3.pipelines import pipeline


def close_results(got, expected, key):
    """Same labels in the same order, scores within 1e-4."""
    assert [[r[key] for r in row] for row in got] == [[r[key] for r in row] for row in expected]
    for row_got, row_expected in zip(got, expected):
        assert [r["score"] for r in row_got] == pytest.approx([r["score"] for r in row_expected], abs=1e-4)


def test_captioning_pipeline_on_onnxruntime_captions_as_pytorch(folders, exports, images):
    torch_pipe = pipeline("captioning", folders["captioning"])
    ort_pipe = pipeline("captioning", exports["captioning"], backend="onnxruntime")
    assert ort_pipe.generation == torch_pipe.generation and ort_pipe.mask_token_id == torch_pipe.mask_token_id
    for beams in (1, 2):
        assert ort_pipe(images, num_beams=beams, max_length=8) == torch_pipe(images, num_beams=beams, max_length=8)


def test_vqa_and_classification_pipelines_on_onnxruntime(folders, exports, images):
    vqa_torch, vqa_ort = pipeline("vqa", folders["vqa"]), pipeline("vqa", exports["vqa"], backend="onnxruntime")
    assert vqa_ort.labels == vqa_torch.labels == [f"answer{i}" for i in range(4)]
    questions = ["what colour is the circle?", "is there a dog?", "what?"]  # different lengths, one batch
    close_results(vqa_ort(images, questions, top_k=3), vqa_torch(images, questions, top_k=3), "answer")
    cls_torch = pipeline("classification", folders["classification"])
    cls_ort = pipeline("classification", exports["classification"], backend="onnxruntime")
    close_results(cls_ort(images, top_k=2), cls_torch(images, top_k=2), "label")


def test_zero_shot_pipeline_on_onnxruntime(folders, exports, images):
    classes = ["red circle", "blue square", "dog"]
    zs_torch = pipeline("zero-shot", folders["zero-shot"], classes=classes)
    zs_ort = pipeline("zero-shot", exports["zero-shot"], backend="onnxruntime", classes=classes)
    assert (zs_ort.class_embeds - zs_torch.class_embeds).abs().max() < 1e-4
    close_results(zs_ort(images, top_k=3), zs_torch(images, top_k=3), "label")


def test_backend_refuses_a_model_folder_and_another_task(folders, exports):
    with pytest.raises(FileNotFoundError, match="not an export folder.*beit3 export"):
        pipeline("vqa", folders["vqa"], backend="onnxruntime")
    with pytest.raises(ValueError, match="holds a Beit3ForImageClassification; task vqav2 needs"):
        pipeline("vqa", exports["classification"], backend="onnxruntime")


def test_predict_cli_with_onnxruntime_backend(folders, exports, images, tmp_path, capsys):
    answers = {}
    for name, model, extra in (("torch", folders["vqa"], []), ("ort", exports["vqa"], ["--backend", "onnxruntime"])):
        out = tmp_path / f"{name}.json"
        assert main(["predict", "vqa", "--model", str(model), "--question", "what colour?", "--top-k", "2",
                     "--output", str(out), *extra, *map(str, images)]) == 0
        answers[name] = json.loads(out.read_text())
    records = {name: value["predictions"] if isinstance(value, dict) else value for name, value in answers.items()}
    assert len(records["ort"]) == 3
    close_results([r["answers"] for r in records["ort"]], [r["answers"] for r in records["torch"]], "answer")
    capsys.readouterr()


def test_search_cli_with_onnxruntime_runtime_queries_a_pytorch_index(folders, exports, images, tmp_path, capsys):
    index = str(tmp_path / "photos.index")
    photos = str(images[0].parent)
    assert main(["search", "index", "--model", str(folders["zero-shot"]), "--index", index, photos,
                 "--workers", "0", "--no-progress"]) == 0
    from beit3.tasks.search import ImageIndex

    torch_index = ImageIndex(index)
    ort_index = ImageIndex(index, model=exports["zero-shot"], runtime="onnxruntime")  # same model, by its export
    assert (ort_index.encoder.embed_images(images) - torch_index.embeddings).abs().max() < 1e-4
    texts = ["a red circle", "two dogs"]
    assert (ort_index.encoder.embed_texts(texts) - torch_index.encoder.embed_texts(texts)).abs().max() < 1e-4
    hits = {}
    for name, extra in (("torch", []), ("ort", ["--model", str(exports["zero-shot"]), "--runtime", "onnxruntime"])):
        out = tmp_path / f"{name}.json"
        assert main(["search", "query", "--index", index, "--text", "a red circle", "--image", str(images[1]),
                     "-k", "3", "--output", str(out), *extra]) == 0
        hits[name] = json.loads(out.read_text())
    assert [[h["path"] for h in q["hits"]] for q in hits["ort"]] == [[h["path"] for h in q["hits"]] for q in hits["torch"]]
    assert [h["score"] for q in hits["ort"] for h in q["hits"]] == pytest.approx(
        [h["score"] for q in hits["torch"] for h in q["hits"]], abs=1e-4)
    capsys.readouterr()


def test_export_cli_writes_torch_export_programs(folders, tmp_path, capsys):
    out = tmp_path / "classification"
    assert main(["export", "--model", str(folders["classification"]), "--out", str(out),
                 "--format", "torch-export"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["graphs"]["classification"]
    assert entry["torch_export"] == "classification.pt2" and "onnx" not in entry
    assert "classification: classification.pt2" in capsys.readouterr().out
    program = torch.export.load(out / entry["torch_export"])
    pixels = torch.randn(3, 3, 32, 32)
    from beit3.models import Beit3ForImageClassification

    model = Beit3ForImageClassification.from_pretrained(folders["classification"]).eval()
    with torch.no_grad():
        assert (program.module()(pixels) - model(pixels).logits).abs().max() < 1e-4
