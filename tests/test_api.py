"""The public API as Hugging Face users expect it: top-level imports, call conventions, load_model, the Hub."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit3
from beit3.config import Beit3Config
from tests.tiny_pipelines import save_model_folder, tiny_tokenizer

KINDS = ("captioning", "vqa", "classification", "nlvr2", "retrieval")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_import_is_lazy_and_names_resolve():
    code = ("import sys, time; t = time.perf_counter(); import beit3; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'beit3.models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"], "import beit3 must not import torch or the models"
    assert float(out[0]) < 0.5
    for name in beit3.__all__:
        assert getattr(beit3, name) is not None, name
    from beit3.models import Beit3ForVisualQuestionAnswering

    assert beit3.Beit3ForVisualQuestionAnswering is Beit3ForVisualQuestionAnswering
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        beit3.Nope  # noqa: B018


def test_tokenizer_follows_hugging_face_conventions(tokenizer):
    one = tokenizer("a red circle")  # Hugging Face's defaults: no padding, lists
    assert isinstance(one["input_ids"], list) and isinstance(one["input_ids"][0], int)  # flat for one string
    assert one["input_ids"][0] == 0 and one["input_ids"][-1] == 2 and one.attention_mask == [1] * len(one.input_ids)
    assert tokenizer.decode(one["input_ids"]) == "a red circle"
    many = tokenizer(["a red circle", "a dog"], padding=True, return_tensors="pt")
    assert many.input_ids.shape[0] == 2 and many.input_ids.shape[1] == len(one["input_ids"])
    assert many.attention_mask[1].sum() < many.attention_mask[0].sum()
    assert tokenizer.batch_decode(many["input_ids"]) == ["a red circle", "a dog"]
    lists = tokenizer(["a red circle", "a dog"], padding="do_not_pad")
    assert [len(r) for r in lists["input_ids"]] == [len(one["input_ids"]), len(tokenizer.encode("a dog"))]
    cut = tokenizer("a red circle is there", max_length=4, padding="max_length", truncation="longest_first",
                    return_tensors="pt")
    assert cut["input_ids"].shape == (1, 4) and cut["input_ids"][0, -1] == 2
    bare = tokenizer("a dog", add_special_tokens=False)
    assert bare["input_ids"] == tokenizer.encode("a dog", add_special_tokens=False)
    with pytest.raises(ValueError, match="different lengths"):
        tokenizer(["a red circle", "a dog"], return_tensors="pt")


def test_processor_returns_a_batch_that_moves(tokenizer, tmp_path):
    from beit3 import Beit3ImageProcessor, Beit3Processor, BatchEncoding

    processor = Beit3Processor(tokenizer, Beit3ImageProcessor(32, "vl"))
    image = torch.rand(3, 40, 40)
    batch = processor(images=[image, image], text=["a red circle", "a dog"], padding=True, return_tensors="pt")
    assert isinstance(batch, BatchEncoding) and set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch.input_ids.shape[1] < processor.max_length  # padded to the longest
    half = batch.to("cpu").to(torch.bfloat16)
    assert half.pixel_values.dtype == torch.bfloat16 and half.input_ids.dtype == torch.long
    import numpy as np

    assert isinstance(processor(images=image, return_tensors="np")["pixel_values"], np.ndarray)


def test_outputs_index_by_name_and_position(tokenizer):
    model = beit3.Beit3ForImageTextRetrieval(Beit3Config.from_preset("tiny", vocab_size=tokenizer.vocab_size, image_size=32))
    text = tokenizer(["a red circle", "a dog"], max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    out = model(torch.rand(2, 3, 32, 32), **text)
    assert out["loss"] is out.loss and out[0] is out.loss and "logit_scale" in out
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert torch.allclose(out.logit_scale, model.logit_scale.exp())
    assert torch.allclose(out.logits_per_image, out.logit_scale * out.image_embeds @ out.text_embeds.t())
    no_loss = model(torch.rand(2, 3, 32, 32), **text, return_loss=False)
    assert "loss" not in no_loss and no_loss[0] is no_loss.image_embeds
    with pytest.raises(KeyError, match="has no 'logits'"):
        no_loss["logits"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_returns_the_saved_class(kind, tokenizer, tmp_path):
    folder = save_model_folder(kind, tokenizer, tmp_path / kind)
    expected = json.loads((folder / "config.json").read_text())["architecture"]
    model = beit3.load_model(folder)
    assert type(model).__name__ == expected
    assert type(beit3.Beit3AutoModel.from_pretrained(folder)) is type(model)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: beit3") and "beit3.load_model" in card


def test_load_model_detects_the_task_of_a_bare_file(tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = save_model_folder("vqa", tokenizer, tmp_path / "vqa")
    from safetensors.torch import load_file

    save_file(load_file(folder / "model.safetensors"), tmp_path / "weights.safetensors")
    model = beit3.load_model(tmp_path / "weights.safetensors")
    assert type(model).__name__ == "Beit3ForVisualQuestionAnswering"


def _fill_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The Hub cache's documented layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_from_pretrained_resolves_a_hub_repository_offline(tokenizer, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    folder = save_model_folder("classification", tokenizer, tmp_path / "cls")
    cache = tmp_path / "hub"
    _fill_hub_cache(cache, "someone/beit3-tiny-cls", folder)
    assert [r.repo_id for r in hub.scan_cache_dir(cache).repos] == ["someone/beit3-tiny-cls"]  # the hub's own reader
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = beit3.load_model("someone/beit3-tiny-cls", cache_dir=cache)
    expected = beit3.Beit3ForImageClassification.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="someone/missing.*not in the local cache"):
        beit3.load_model("someone/missing", cache_dir=cache)


def test_push_to_hub_uploads_a_complete_folder(tokenizer, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    uploaded: dict[str, list[str]] = {}

    class FakeApi:  # no network here: record what would be sent
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **options):
            uploaded["created"] = [repo_id]

        def upload_folder(self, *, repo_id, folder_path, **options):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            beit3.load_model(folder_path)  # what is uploaded loads
            return "commit"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    from beit3 import Beit3ImageProcessor, Beit3Processor

    model = beit3.Beit3ForCaptioning(Beit3Config.from_preset("tiny", vocab_size=tokenizer.vocab_size, image_size=32),
                                     mask_token_id=tokenizer.mask_token_id)
    processor = Beit3Processor(tokenizer, Beit3ImageProcessor(32, "vl"))
    assert model.push_to_hub("someone/captioner", processor=processor) == "commit"
    assert uploaded["created"] == ["someone/captioner"]
    assert {"config.json", "model.safetensors", "README.md", "sentencepiece.model", "tokenizer_config.json",
            "processor_config.json"} <= set(uploaded["files"])
