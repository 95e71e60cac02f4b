"""Tiny model folders of every exportable task, exported once for the whole package (ONNX + .pt2)."""
from __future__ import annotations

import pytest
import torch

from beit3.export.exporter import export_model
from tests.tiny_pipelines import save_model_folders, tiny_tokenizer, write_images

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("export_tokenizer"))


@pytest.fixture(scope="session")
def folders(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_models")
    folders = save_model_folders(tokenizer, root)
    (folders["vqa"] / "labels.txt").write_text("".join(f"answer{i}\n" for i in range(4)))
    return folders


class _Exports(dict):
    """kind -> export folder, each exported on first use. Classification also gets int8 graphs and
    goes through the ONNX optimizer (what `beit3 export` does by default); the others skip the
    optimizer to keep the tests short."""

    def __init__(self, folders, root):
        super().__init__()
        self.folders, self.root = folders, root

    def __missing__(self, kind):
        torch.manual_seed(0)
        classification = kind == "classification"
        export_model(self.folders[kind], self.root / kind, quantize="int8" if classification else None,
                     optimize=classification)
        self[kind] = self.root / kind
        return self[kind]


@pytest.fixture(scope="session")
def exports(folders, tmp_path_factory):
    return _Exports(folders, tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("export_images"), 3)
