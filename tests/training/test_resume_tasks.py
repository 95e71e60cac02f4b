"""`--resume auto` works for every task of the catalogue (issue 21, item 1).

Image-only tasks never give the text parameters a gradient, so AdamW holds no state for them; the
strict optimizer load refused such checkpoints ("Missing optimizer state for parameter
'beit3.text_pos_embed'"). Each task trains 2 steps on a tiny synthetic world (32 px images), then
a second run resumes the finished run and trains one more step.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from beit3.catalogue import iter_tasks
from beit3.training import Trainer, build_task, load_config
from beit3.training import checkpoint as ckpt

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {
    "captioning": "tiny_captioning.yaml", "classification": "tiny_imagenet.yaml", "detection": "tiny_detection.yaml",
    "nlvr2": "tiny_nlvr2.yaml", "retrieval": "tiny_retrieval.yaml", "segmentation": "tiny_segmentation.yaml",
    "vqav2": "tiny_vqav2.yaml", "mdm": "pretrain_tiny.yaml",
}
IMAGE_ONLY = {"classification", "detection", "segmentation"}
TASK_OPTIONS = {
    "captioning": ["task.options.num_beams=1", "task.options.max_decode_len=4"],
    "classification": ["task.options.mixup=0.0", "task.options.cutmix=0.0"],
    "detection": ["task.options.rois_per_image=8", "task.options.out_channels=16"],
    "segmentation": ["task.options.out_channels=16"],
    "mdm": ["task.options.visual_tokenizer=vqkd", "task.options.tokenizer=tokenizer", "task.options.val_size=2",
            "task.options.text_length=16", "task.options.caption_length=8"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A few images per task, a 60-piece tokenizer and an untrained tiny VQ-KD (seconds)."""
    from beit3.data.synthetic import generate
    from beit3.data.synthetic.world import WorldSize
    from beit3.pretraining.vqkd import VQKD, VQKDConfig
    from beit3.processing import train_tokenizer

    root = tmp_path_factory.mktemp("world")
    size = WorldSize(coco_train=40, coco_val=4, vqa_test=1, questions_per_image=3, flickr=2, nlvr2_train=4,
                     nlvr2_eval=2, class_train=1, class_val=1, detection_train=2, detection_val=2,
                     pretrain_pairs=8, pretrain_images=8, pretrain_texts=16, shards=1, rest_val_images=2)
    generate(root, size=size, seed=0, image_size=32)
    train_tokenizer([root / "corpus.txt"], 60, root / "tokenizer", progress=False, num_threads=1,
                    character_coverage=1.0)
    torch.manual_seed(0)
    VQKD(VQKDConfig.tiny(codebook_size=16)).save_pretrained(root / "vqkd")
    return root


def test_every_task_of_the_catalogue_is_covered():
    names = {spec.name for spec in iter_tasks("finetune")} | {"mdm"}
    assert names == set(RECIPES)


def _config(task: str, world: Path, out: Path, *extra: str):
    root = world if task == "mdm" else world / "detection" if task in {"detection", "segmentation"} else world / "index"
    overrides = [f"data.root={root}", f"train.output_dir={out}", "model.image_size=32", "data.batch_size=2",
                 "data.eval_batch_size=2", "schedule.warmup_steps=1", "train.checkpoint_every=2",
                 "train.eval_every=1000", "train.log_every=1", "train.progress_bar=false", "train.threads=1",
                 *TASK_OPTIONS.get(task, [])]
    if task not in IMAGE_ONLY and task != "mdm":
        overrides.append(f"task.options.tokenizer={world / 'tokenizer'}")
    return load_config(CONFIGS / RECIPES[task], overrides + list(extra))


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_resume_auto_continues_a_finished_run(task, world, tmp_path):
    out = tmp_path / "run"
    cfg = _config(task, world, out, "schedule.max_steps=2")
    first = Trainer(cfg, build_task(cfg)).fit()
    assert first.stop_reason == "completed" and first.step == 2

    saved = ckpt.load_checkpoint(ckpt.find_resumable(out / "checkpoints"))[1]["optimizer"]
    names = [name for group in saved["param_groups"] for name in group["params"]]
    stateless = [name for name in names if name not in saved["state"]]
    if task in IMAGE_ONLY:  # the case that failed: parameters the task never gives a gradient
        assert any("text" in name for name in stateless), stateless

    cfg = _config(task, world, out, "schedule.max_steps=3", "train.resume=auto")
    trainer = Trainer(cfg, build_task(cfg))
    second = trainer.fit()
    assert second.stop_reason == "completed" and second.step == 3
    assert second.summary["steps_this_run"] == 1
    # the resumed optimizer kept the saved moments and still holds none for the unused parameters
    by_name = dict(trainer.raw_model.named_parameters())
    for name in stateless:
        assert not trainer.optimizer.state.get(by_name[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3]


def test_a_text_length_beyond_the_position_table_fails_before_any_data(world, tmp_path, monkeypatch):
    """Item 17: the tiny model has 128 text positions (126 tokens); 200 used to fail at the first batch."""
    cfg = _config("vqav2", world, tmp_path / "run", "schedule.max_steps=1", "task.options.max_text_len=200")
    task = build_task(cfg)

    def never(*args, **kwargs):
        raise AssertionError("datasets were built before the text length was checked")

    monkeypatch.setattr(type(task), "build_datasets", never)
    with pytest.raises(ValueError) as caught:
        Trainer(cfg, task).fit()
    message = str(caught.value)
    assert "task.options.max_text_len=200" in message and "max_text_positions=128" in message and "126" in message


def test_label_names_are_found_from_another_folder(world, tmp_path, monkeypatch):
    """Item 19: run.yaml stores data.root absolute, so the classifier's label names are found from
    any working folder (a relative data.root was read against the new folder and lost)."""
    from beit3.pipelines import resolve_label_names

    monkeypatch.chdir(world)
    cfg = _config("classification", world, tmp_path / "run", "schedule.max_steps=1")
    cfg.data.root = "index"  # as typed on the command line, relative to the working folder
    assert Trainer(cfg, build_task(cfg)).fit().step == 1
    monkeypatch.chdir(tmp_path)
    names, source = resolve_label_names(tmp_path / "run" / "final", 24, None, "imagenet.classes.txt")
    assert source == str(world / "index" / "imagenet.classes.txt")
    assert names == (world / "index" / "imagenet.classes.txt").read_text().split("\n")[:24]


def test_convert_gathers_a_sharded_checkpoint_into_a_model_folder(world, tmp_path):
    """`beit3 convert` on a sharded (torch.distributed.checkpoint) checkpoint of a real task writes the
    folder `from_pretrained` reads, with the run's final weights."""
    from safetensors.torch import load_file

    from beit3.models import Beit3ForVisualQuestionAnswering
    from tests.faults import run_cli

    out = tmp_path / "run"
    cfg = _config("vqav2", world, out, "schedule.max_steps=2", "train.checkpoint_format=sharded")
    Trainer(cfg, build_task(cfg)).fit()
    step = ckpt.find_resumable(out / "checkpoints")
    assert ckpt.is_sharded(step)
    code, printed, err = run_cli(["convert", step, tmp_path / "converted"])
    assert code == 0, err
    assert "sharded checkpoint gathered" in err and "Beit3ForVisualQuestionAnswering" in printed
    model = Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "converted")
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())
