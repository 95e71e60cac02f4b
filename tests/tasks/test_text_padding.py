"""``data.text_padding=longest``: batches carry their longest text (rounded up to 8), not the task's
``max_text_len``, and the models give the same outputs as on fully padded batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from beit3.catalogue import get_task
from beit3.tasks.common import TextCollate
from beit3.training.config import config_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def make_task(name: str, world: Path, tokenizer: Path, padding: str):
    recipe = yaml.safe_load((CONFIGS / f"tiny_{name}.yaml").read_text())
    recipe["task"]["options"]["tokenizer"] = str(tokenizer)
    recipe["data"].update(root=str(world / "index"), text_padding=padding)
    return get_task(name).task_class(config_from_dict(recipe))


def test_the_cut_keeps_every_attended_column_and_rounds_up():
    rows = [{"input_ids": torch.arange(32), "attention_mask": (torch.arange(32) < n).long(),
             "labels": torch.arange(32) * 2, "pixel_values": torch.zeros(3, 4, 4)} for n in (5, 11, 3)]
    batch = TextCollate(("input_ids", "attention_mask", "labels"))(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [5, 11, 3]  # nothing attended is cut
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    full = TextCollate(multiple=8)([{"attention_mask": torch.ones(12, dtype=torch.long)}])
    assert full["attention_mask"].shape == (1, 12)  # never longer than the rows
    assert TextCollate()([{"labels": torch.tensor(3)}])["labels"].tolist() == [3]  # no text: as it is


@pytest.mark.parametrize("name", ["vqav2", "captioning", "nlvr2", "retrieval"])
def test_cut_batches_give_the_outputs_of_fully_padded_ones(name, world, tokenizer_dir):
    cut_task = make_task(name, world, tokenizer_dir, "longest")
    full_task = make_task(name, world, tokenizer_dir, "max_length")
    train, _ = full_task.build_datasets(full_task.cfg)
    rows = []
    for i in range(40):
        torch.manual_seed(i)  # captioning masks words at random: the same rows for both collates
        rows.append(train[i])
    rows = sorted(rows, key=lambda row: int(row["attention_mask"].sum()))[:6]  # short texts: a cut to see
    cut, full = cut_task.collate_fn(rows), full_task.collate_fn(rows)
    max_len = int(full_task.options["max_text_len"])
    assert full["input_ids"].shape[1] == max_len
    assert cut["input_ids"].shape[1] < max_len and cut["input_ids"].shape[1] % 8 == 0
    torch.manual_seed(0)
    model = full_task.build_model(full_task.cfg).eval()
    with torch.no_grad():
        loss_cut, _ = full_task.train_step(model, cut, step=0)
        loss_full, _ = full_task.train_step(model, full, step=0)
    assert loss_cut.item() == pytest.approx(loss_full.item(), rel=1e-5, abs=1e-6)


def test_an_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="text_padding"):
        config_from_dict({"task": {"name": "vqav2"}, "data": {"text_padding": "shortest"}})
