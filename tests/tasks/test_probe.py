"""Linear probes on frozen features (`beit3 probe`): the ridge fit, the pooling, the command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from beit3.config import Beit3Config
from beit3.models import Beit3Model
from beit3.tasks.probe import frozen_features, pool, ridge_probe
from tests.faults import assert_one_line_error, run_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_ridge_probe_reads_a_linear_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=generator)
    labels = (x @ torch.randn(16, 4, generator=generator)).argmax(1)  # 4 classes, linear in x
    targets = torch.nn.functional.one_hot(labels, 4).float()
    linear = ridge_probe((x[:400], targets[:400]), (x[400:], targets[400:]))
    noise = ridge_probe((torch.randn(400, 16, generator=generator), targets[:400]), (x[400:], targets[400:]))
    assert linear.score > 75 and linear.val_samples == 200 and linear.dim == 16
    assert noise.score < 45  # chance is a quarter
    # soft targets (VQA): the score is the target mass on the predicted column
    soft = targets * 0.6
    assert ridge_probe((x[:400], soft[:400]), (x[400:], soft[400:])).score == pytest.approx(0.6 * linear.score)
    # deterministic: the held-out fifth is drawn from a fixed seed
    assert ridge_probe((x[:400], targets[:400]), (x[400:], targets[400:])) == linear
    with pytest.raises(ValueError, match="at least 5 training"):
        ridge_probe((x[:3], targets[:3]), (x[3:5], targets[3:5]))


def test_labels_sorted_by_class_still_get_a_fair_strength():
    """Index files list samples class by class; a held-out tail would hold one class only."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(60)
    x = torch.nn.functional.one_hot(labels, 5).float() + 0.4 * torch.randn(300, 5, generator=generator)
    targets = torch.nn.functional.one_hot(labels, 5).float()
    result = ridge_probe((x, targets), (x, targets))
    assert result.alpha < 1e4 and result.score > 80


def test_pooled_features_ignore_padding():
    torch.manual_seed(0)
    model = Beit3Model(Beit3Config.from_preset("tiny")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 7, 2, 1, 1, 1], [0, 9, 2, 1, 1, 1, 1, 1]])
    mask = (ids != 1).long()
    for features in ("text", "pair"):
        padded = frozen_features(model, [{"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
                                          "labels": torch.tensor([0, 1])}], features, num_classes=2)
        short = frozen_features(model, [{"pixel_values": pixels[:1], "input_ids": ids[:1, :5],
                                         "attention_mask": mask[:1, :5], "labels": torch.tensor([0])}], features, 2)
        torch.testing.assert_close(padded[0][:1], short[0], atol=1e-5, rtol=1e-5)
        assert padded[1].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    assert pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[0, 1, 2, 3, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="no input_ids"):
        frozen_features(model, [{"pixel_values": pixels, "labels": torch.tensor([0, 1])}], "text", 2)


def test_probe_command_on_pretrained_and_random_weights(world, tokenizer_dir, pretrained_dir, tmp_path):
    """The random initialisation is the scratch run's (seeded by train.seed); a pretrained folder's
    weights give other features; the JSON holds what the table line says."""
    common = ["--recipe", CONFIGS / "tiny_vqav2.yaml", f"data.root={world / 'index'}",
              f"task.options.tokenizer={tokenizer_dir}", "train.seed=3"]
    scores = {}
    for name, extra in (("random", []), ("again", []), ("pretrained", [f"model.pretrained={pretrained_dir}"])):
        code, out, err = run_cli(["probe", "--features", "text", "--output", tmp_path / f"{name}.json", *common, *extra])
        assert code == 0, err
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["task"] == "vqav2" and result["features"] == "text" and result["dim"] == 128
        assert f"{result['score']:.2f}" in out
        scores[name] = result["train_score"]
    assert scores["random"] == scores["again"] != scores["pretrained"]
    code, out, err = run_cli(["probe", "--recipe", CONFIGS / "tiny_imagenet.yaml", f"data.root={world / 'index'}"])
    assert code == 0 and "from image features" in out, err


def test_probe_command_refuses_what_it_cannot_probe(world, tokenizer_dir):
    code, _, err = run_cli(["probe", "--recipe", CONFIGS / "tiny_captioning.yaml", f"data.root={world / 'index'}",
                            f"task.options.tokenizer={tokenizer_dir}"])
    assert_one_line_error(code, err, "captioning", "no linear probe")
    code, _, err = run_cli(["probe", "--recipe", CONFIGS / "tiny_imagenet.yaml", "--features", "text",
                            f"data.root={world / 'index'}"])
    assert_one_line_error(code, err, "classification probes image features, not text")
