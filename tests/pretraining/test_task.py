"""`beit3 pretrain` on the synthetic world: a few engine steps end to end (seconds on CPU)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


from beit3.data.synthetic import world
from beit3.pretraining.vqkd_training import codebook_usage, train_visual_tokenizer
from beit3.pretraining.data import collect_refs
from beit3.pretraining.task import export_pretrained
from beit3.pretraining.teachers import HOGTeacher
from beit3.processing import Beit3Tokenizer
from beit3.pretraining.vqkd import VQKDConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL_WORLD = world.WorldSize(coco_train=2, coco_val=2, vqa_test=1, questions_per_image=1, flickr=2, nlvr2_train=2,
                              nlvr2_eval=2, class_train=1, class_val=1, detection_train=1, detection_val=1,
                              pretrain_pairs=48, pretrain_images=48, pretrain_texts=96, shards=2, rest_val_images=1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    world.generate(root, size=SMALL_WORLD, image_size=32, build_indexes=False)
    from beit3.data import TarShards

    source = TarShards(str(root / "pretrain/images/*.tar"))
    refs = collect_refs(source)
    vqkd = train_visual_tokenizer(refs, source.load, VQKDConfig.tiny(codebook_size=64), HOGTeacher(8), steps=3,
                                  batch_size=16, lr=1e-3, log_every=0)
    vqkd.save_pretrained(root / "vqkd")
    report = codebook_usage(vqkd, refs, source.load)
    assert report["num_patches"] == 48 * 16 and 0 < report["usage"] <= 1
    return root


def test_pretrain_runs_on_the_engine_and_its_weights_fine_tune(synthetic, tmp_path):
    from beit3.cli import main
    from beit3.models import Beit3ForVisualQuestionAnswering

    out = tmp_path / "run"
    status = main(["pretrain", "--recipe", str(CONFIGS / "pretrain_tiny.yaml"), "--output-dir", str(out),
                   f"data.root={synthetic}", "task.options.visual_tokenizer=vqkd", "task.options.tokenizer=null",
                   "task.options.text_vocab_size=64", "task.options.val_size=8", "data.batch_size=8",
                   "schedule.max_steps=3", "schedule.warmup_steps=1", "train.eval_every=3",
                   "train.checkpoint_every=null", "train.log_every=1"])
    assert status == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"][-1]
    assert len(train) == 3
    for stream, vocab in (("text_mlm", 66), ("pair_mlm", 66), ("image_mim", 64), ("pair_mim", 64)):
        assert f"{stream}_loss" in train[0] and f"{stream}_acc" in val
        assert abs(train[0][f"{stream}_loss"] - torch.log(torch.tensor(float(vocab)))) < 0.6
    assert "pair_mlm_loss_shuffled" in val and val["loss"] > 0
    for stream, vocab in (("text_mlm", 66), ("image_mim", 64)):
        assert 0 < val[f"{stream}_unigram_entropy"] <= math.log(vocab)
    assert (out / "text_tokenizer").is_dir()
    # export_pretrained turns the run into a from_pretrained folder with the text tokenizer
    exported = export_pretrained(out, tmp_path / "exported")
    model = Beit3ForVisualQuestionAnswering.from_pretrained(exported, init_head=True, num_labels=5)
    pretrained = load_file(str(out / "final" / "model.safetensors"))
    assert model.config.vocab_size == 66 and model.config.num_heads == 4
    for key, value in model.beit3.state_dict().items():
        assert torch.equal(value, pretrained["beit3." + key]), key
    assert Beit3Tokenizer.from_pretrained(exported).vocab_size == 66


def test_recipes_for_the_paper_sizes_load():
    from beit3.training import load_config

    for size in ("base", "large", "giant"):
        cfg = load_config(CONFIGS / f"pretrain_{size}.yaml")
        assert cfg.task.name == "mdm" and cfg.model.preset == size
        assert cfg.data.batch_size == 2048 and cfg.optim.lr == 1e-3  # 2048 x (image, text, pair) = 6144
        assert tuple(cfg.optim.betas) == (0.9, 0.98) and cfg.optim.eps == 1e-6
        assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad == 3.0
        assert cfg.model.drop_path_rate == 0.1 and cfg.task.options["vocab_size"] == 64010
        assert cfg.schedule.warmup_steps == 10000 and cfg.schedule.max_steps == 1_000_000


def test_visual_tokenizer_command_trains_and_reports_usage(synthetic, tmp_path, capsys):
    from beit3.cli import main

    images = str(synthetic / "pretrain/images/*.tar")
    assert main(["visual-tokenizer", "train", "--images", images, "--out", str(tmp_path / "vq"), "--preset", "tiny",
                 "--codebook-size", "32", "--steps", "2", "--batch-size", "8", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["codebook_size"] == 32 and report["used_codes"] >= 1
    assert json.loads((tmp_path / "vq" / "codebook_usage.json").read_text()) == report
    assert main(["visual-tokenizer", "usage", "--tokenizer", str(tmp_path / "vq"), "--images", images,
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["num_patches"] == 48 * 16


def test_itc_tuning_starts_from_an_mdm_export_and_feeds_retrieval(synthetic, tmp_path):
    from beit3.cli import main
    from beit3.config import Beit3Config
    from beit3.models import Beit3ForImageTextRetrieval, Beit3ForPreTraining
    from beit3.processing import train_tokenizer

    tokenizer = train_tokenizer([synthetic / "pretrain/texts.txt"], 64, progress=False, num_threads=1)
    source = tmp_path / "mdm"
    Beit3ForPreTraining(Beit3Config.from_preset("tiny", vocab_size=tokenizer.vocab_size), visual_vocab_size=64
                        ).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "itc"
    status = main(["pretrain", "--objective", "itc", "--recipe", str(CONFIGS / "pretrain_tiny.yaml"), "--output-dir", str(out),
                   f"data.root={synthetic}", "task.options={val_size: 8, text_length: 24}",
                   f"model.pretrained={source}", "data.batch_size=8", "schedule.max_steps=2",
                   "schedule.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=null"])
    assert status == 0
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    assert {"tr_r1", "ir_r1", "average_score"} <= set(val)
    tuned = load_file(str(out / "final" / "model.safetensors"))
    mdm = load_file(str(source / "model.safetensors"))
    assert set(tuned) == set(Beit3ForImageTextRetrieval(Beit3Config.from_preset("tiny")).state_dict())
    assert not torch.equal(tuned["beit3.text_embed.weight"], mdm["beit3.text_embed.weight"])


STAGES = ("task.options.stages=[{name: vision, steps: 2, sources: [images]}, "
          "{name: language, steps: 2, sources: [texts, pairs], freeze: [vision, shared]}, {name: joint, steps: 2}]")


def _staged(synthetic, out, *extra):
    return ["pretrain", "--recipe", str(CONFIGS / "pretrain_tiny.yaml"), "--output-dir", str(out),
            f"data.root={synthetic}", "task.options.visual_tokenizer=vqkd", "task.options.tokenizer=null",
            "task.options.text_vocab_size=64", "task.options.val_size=8", "data.batch_size=8", STAGES,
            "schedule.max_steps=6", "schedule.warmup_steps=1", "train.eval_every=6", "train.checkpoint_every=2",
            "train.keep_last=5", "train.log_every=1", *extra]


def test_stage_wise_pretraining_trains_each_stage_s_sources_and_experts_and_resumes(synthetic, tmp_path):
    """Stages as VLMo's: images only; then texts (and pairs here, so that the frozen vision side does
    get gradients) with the vision experts and the shared weights frozen; then everything. Resumed
    from the checkpoint at the stage boundary the run continues exactly."""
    from beit3.cli import main
    from beit3.pretraining.task import parameter_group

    out = tmp_path / "run"
    assert main(_staged(synthetic, out)) == 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in train if row["split"] == "train"]
    assert [row["stage"] for row in train] == [1, 1, 2, 2, 3, 3]
    streams = [{k[:-5] for k in row if k.endswith("_loss") and k != "loss"} for row in train]
    assert streams[:4] == [{"image_mim"}] * 2 + [{"text_mlm", "pair_mlm", "pair_mim"}] * 2
    assert streams[4] == {"image_mim", "text_mlm", "pair_mlm", "pair_mim"}

    weights = {step: load_file(str(out / f"checkpoints/step_{step:08d}/model.safetensors")) for step in (2, 4, 6)}
    groups = {name: parameter_group(name) for name in weights[2]}
    assert {"vision", "language"} == set(groups.values())  # the tiny preset is decoupled: nothing is shared
    for name, group in groups.items():
        stage2_moved = not torch.equal(weights[2][name], weights[4][name])
        if group in ("vision", "shared"):
            assert not stage2_moved, name  # frozen in stage 2 (no update, no weight decay)
        elif name.startswith(("beit3.text_embed", "mlm_head")) or ".text." in name:
            assert stage2_moved, name  # the language side learns from the texts
    moved = [name for name in groups if groups[name] == "vision" and not torch.equal(weights[4][name], weights[6][name])]
    assert moved and "mim_head.weight" in moved  # stage 3 trains the vision side again

    # resumed from the step-2 checkpoint (end of stage 1): steps 3-6 as in the uninterrupted run
    resumed = tmp_path / "resumed"
    assert main(_staged(synthetic, resumed, f"train.resume={out / 'checkpoints/step_00000002'}")) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    again = [row for row in again if row["split"] == "train"]
    assert [row["step"] for row in again] == [3, 4, 5, 6]
    assert [row["loss"] for row in again] == [row["loss"] for row in train[2:]]
    final = load_file(str(resumed / "final/model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in load_file(str(out / "final/model.safetensors")).items())


def test_stages_are_checked_against_the_schedule_and_their_names(synthetic, tmp_path, capsys):
    from beit3.cli import main

    for extra, message in (("schedule.max_steps=5", "set schedule.max_steps=6"),
                           ("task.options.stages=[{steps: 6, freeze: [attention]}]", "stages[0].freeze: unknown group"),
                           ("task.options.stages=[{steps: 6, sources: [captions]}]", "stages[0].sources")):
        assert main(_staged(synthetic, tmp_path / "run", extra)) == 1
        assert message in capsys.readouterr().err
