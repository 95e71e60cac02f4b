"""Folders in the layout of the transformers BEiT-3 pull request: config.json + pytorch_model.bin or
model.safetensors, keys such as beit3.encoder.layers.0.self_attn.query_proj.image.weight.

The fixtures are written here from the official names (tests/models/reference.py) with the PR's
renames, independently of the reader under test; one revision of the PR's conversion named the
vision expert "text", which the reader must see through (it goes by the position tables).
"""
import json
import re

import pytest

import beit3
import torch

from beit3.config import Beit3Config
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
    CheckpointError,
    load_any_model,
)
from beit3.models.convert import detect_layout, load_pretrained
from tests.faults import run_cli
from tests.models.reference import official_names

TINY = Beit3Config.from_preset("tiny")  # 4 heads of 16: the folder's config.json must supply them
HF_ARCHITECTURE = {Beit3ForVisualQuestionAnswering: "Beit3ForQuestionAnswering",
                   Beit3ForVisualReasoning: "Beit3ForImagesAndTextClassification"}
HEADS = {"head": "classifier", "mlm_head": "mlm_classifier", "vision_head": "vision_classifier",
         "language_head": "language_classifier"}


def randomised(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def hf_names(model, swapped: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under the PR's names (``swapped``: vision expert called "text")."""
    vision, text = ("text", "image") if swapped else ("image", "text")
    out = {}
    for key, value in official_names(model.backbone).items():
        key = re.sub(r"\.A\.|\.A$", f".{vision}.", key).replace(".B.", f".{text}.")
        key = re.sub(r"self_attn\.([qkv])_proj\.", lambda m: f"self_attn.{dict(q='query', k='key', v='value')[m[1]]}_proj.",
                     key)
        key = key.replace("encoder.layer_norm.", "encoder.fc_norm.").replace("text_embed.", "text_embedding.")
        key = key.replace("vision_embed.proj.", "vision_embedding.projection.").replace("vision_embed.", "vision_embedding.")
        out["beit3." + key] = value
    for key, value in model.state_dict().items():
        if key.startswith("beit3."):
            continue
        head, _, rest = key.partition(".")
        out["beit3." + key if head == "pooler" else ".".join(filter(None, [HEADS.get(head, head), rest]))] = value
    return out


def write_hf_folder(folder, model, weights: str, swapped: bool = False):
    folder.mkdir(parents=True)
    state = {k: v.clone().contiguous() for k, v in hf_names(model, swapped).items()}
    if weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / weights), metadata={"format": "pt"})
    else:
        torch.save(state, folder / weights)
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "beit3", "architectures": [HF_ARCHITECTURE.get(type(model), type(model).__name__)],
        "hidden_size": c.hidden_size, "num_attention_heads": c.num_heads, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "image_size": c.image_size, "patch_size": c.patch_size,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_text_positions, "layer_norm_eps": 1e-5,
    }))
    return folder


def assert_same_tensors(loaded, source):
    expected, actual = source.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_fixture_uses_the_pr_names():
    names = set(hf_names(Beit3ForVisualQuestionAnswering(TINY, num_labels=3)))
    for key in ("beit3.encoder.layers.1.self_attn.query_proj.image.weight", "beit3.encoder.layers.0.self_attn.out_proj.text.bias",
                "beit3.encoder.layers.0.self_attn.inner_attn_ln.image.weight", "beit3.encoder.layers.0.ffn.text.ffn_layernorm.bias",
                "beit3.encoder.layers.0.self_attn_layer_norm.image.weight", "beit3.encoder.layers.0.final_layer_norm.text.bias",
                "beit3.encoder.embed_positions.image.weight", "beit3.encoder.embed_positions.text.weight",
                "beit3.text_embedding.weight", "beit3.vision_embedding.projection.weight", "beit3.vision_embedding.cls_token",
                "beit3.pooler.dense.weight", "classifier.0.weight", "classifier.3.bias"):
        assert key in names, key
    assert detect_layout(dict.fromkeys(names)) == "hf"


CASES = [
    (Beit3ForVisualQuestionAnswering, {"num_labels": 5}, "pytorch_model.bin", False),
    (Beit3ForVisualQuestionAnswering, {"num_labels": 5}, "model.safetensors", True),
    (Beit3ForImageTextRetrieval, {}, "model.safetensors", False),
    (Beit3ForCaptioning, {"mask_token_id": 4}, "pytorch_model.bin", True),
    (Beit3ForVisualReasoning, {}, "pytorch_model.bin", False),
    (Beit3ForImageClassification, {"num_labels": 3}, "model.safetensors", True),
]


@pytest.mark.parametrize("cls,head_args,weights,swapped", CASES)
def test_hf_folder_loads_every_tensor_exactly(tmp_path, cls, head_args, weights, swapped):
    config = TINY.replace(final_norm=cls not in (Beit3ForVisualQuestionAnswering, Beit3ForImageClassification))
    source = randomised(cls(config, **head_args))
    folder = write_hf_folder(tmp_path / "hf", source, weights, swapped)
    mask = {k: v for k, v in head_args.items() if k == "mask_token_id"}
    loaded = cls.from_pretrained(folder, **mask)
    assert loaded.config.num_heads == 4  # from config.json: width / 64 would give 1
    assert_same_tensors(loaded, source)
    detected = beit3.load_model(folder, **mask)  # the class comes from the head keys
    assert type(detected) is cls
    assert_same_tensors(detected, source)
    # The weights file alone loads too, with the heads given by hand.
    assert_same_tensors(cls.from_pretrained(folder / weights, num_heads=4, **head_args), source)


def test_convert_command_reads_an_hf_folder(tmp_path):
    source = randomised(Beit3ForVisualQuestionAnswering(TINY.replace(final_norm=False), num_labels=5))
    folder = write_hf_folder(tmp_path / "hf", source, "pytorch_model.bin", swapped=True)
    code, out, err = run_cli(["convert", folder, tmp_path / "out"])
    assert code == 0, err
    assert "(hf layout)" in out and "Beit3ForVisualQuestionAnswering" in out
    assert_same_tensors(load_any_model(tmp_path / "out"), source)
    backbone = load_pretrained(Beit3Model, folder)
    assert_same_tensors(backbone, source.beit3)


def test_expert_tables_of_equal_shape_are_refused(tmp_path):
    """With a text table of a square + 3 rows as well, nothing tells the experts apart."""
    source = Beit3Model(TINY.replace(max_text_positions=TINY.vision_positions))
    folder = write_hf_folder(tmp_path / "hf", source, "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot tell the vision expert"):
        load_pretrained(Beit3Model, folder)
