"""beit3.pipelines: results equal the models' own outputs, and model folders are read completely."""
from __future__ import annotations

import json

import numpy as np
import pytest

from beit3.catalogue import get_task
import torch
import torch.nn.functional as F
from PIL import Image

from beit3.pipelines import DEFAULT_TEMPLATES, ZeroShotPipeline, pipeline
from beit3.processing import Beit3ImageProcessor
from tests.tiny_pipelines import save_model_folders, tiny_model, tiny_tokenizer, write_images


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 3)


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    return save_model_folders(tokenizer, tmp_path_factory.mktemp("models"))


def pixels(task, paths, size=32):
    return Beit3ImageProcessor(size, get_task(task).image_mode)(list(paths))["pixel_values"]


def test_captioning_equals_generate_and_decode(folders, tokenizer, images):
    captioner = pipeline("captioning", folders["captioning"], device="cpu")
    ids = captioner.model.generate(pixels("captioning", images), num_beams=2, max_length=8)
    expected = [{"caption": text} for text in tokenizer.batch_decode(ids)]
    assert captioner(images, num_beams=2, max_length=8) == expected
    assert captioner(images[1], num_beams=2, max_length=8) == expected[1]  # one image -> one result
    # batching inside the pipeline does not change the result
    captioner.batch_size = 2
    assert captioner(images, num_beams=2, max_length=8) == expected


def test_vqa_top_k_are_sigmoid_scores_of_the_logits_with_names(folders, tokenizer, images, tmp_path):
    folder = folders["vqa"]
    (folder / "labels.txt").write_text("yes\nno\nred\ntwo\n")
    vqa = pipeline("vqa", folder)
    assert vqa.labels == ["yes", "no", "red", "two"] and vqa.labels_source == str(folder / "labels.txt")
    text = tokenizer(["what colour?"] * 3, max_length=64, padding="max_length", truncation=True, return_tensors="pt")
    probs = vqa.model(pixels("vqav2", images), **text).logits.sigmoid()
    results = vqa(images, "what colour?", top_k=2)
    for row, result in zip(probs, results):
        top = row.topk(2)
        assert [r["answer"] for r in result] == [vqa.labels[i] for i in top.indices]
        assert [r["score"] for r in result] == pytest.approx(top.values.tolist(), abs=1e-6)
    alone, batched = vqa(images[0], "what colour?", top_k=9), vqa(images, ["what colour?"] * 3, top_k=9)[0]
    assert [r["answer"] for r in alone] == [r["answer"] for r in batched]
    assert [r["score"] for r in alone] == pytest.approx([r["score"] for r in batched], abs=1e-6)  # batch-size rounding
    assert len(vqa(images[0], "what colour?", top_k=9)) == 4  # never more than the answers there are
    with pytest.raises(ValueError, match="3 images but 2 questions"):
        vqa(images, ["a?", "b?"])
    (folder / "labels.txt").unlink()


def test_classification_softmax_and_every_input_kind(folders, images):
    classify = pipeline("classify", folders["classification"], labels=["cat", "dog", "bird", "fish"])
    probs = classify.model(pixels("classification", images)).logits.softmax(-1)
    result = classify(images, top_k=4)
    assert [[r["label"] for r in row] for row in result] == [[classify.labels[i] for i in p.argsort(descending=True)]
                                                            for p in probs]
    assert sum(r["score"] for r in result[0]) == pytest.approx(1.0, abs=1e-5)
    # a path, a PIL image, a uint8 array and a float tensor of the same picture agree
    picture = Image.open(images[0]).convert("RGB")
    array = np.array(picture)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    scores = [[r["score"] for r in classify(x)] for x in (images[0], picture, array, tensor)]
    for other in scores[1:]:
        assert other == pytest.approx(scores[0], abs=1e-5)
    with pytest.raises(ValueError, match="names 2 labels but the model predicts 4"):
        pipeline("classification", folders["classification"], labels=["a", "b"])


def test_nlvr2_probability_is_softmax_true(folders, tokenizer, images):
    judge = pipeline("nlvr2", folders["nlvr2"])
    pairs = [(images[0], images[1]), (images[2], images[0])]
    statements = ["two dogs", "a red circle"]
    pair_pixels = pixels("nlvr2", [im for pair in pairs for im in pair]).view(2, 2, 3, 32, 32)
    expected = judge.model(pair_pixels, **tokenizer(statements, max_length=64, padding="max_length", truncation=True, return_tensors="pt")).logits.softmax(-1)[:, 1]
    results = judge(pairs, statements)
    assert [r["probability"] for r in results] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [r["true"] for r in results] == [p >= 0.5 for p in expected.tolist()]
    assert judge(pairs[1], statements[1]) == results[1]  # one pair and one statement -> one result


def test_zero_shot_averages_prompt_embeddings_like_a_hand_computation(folders, tokenizer, images):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    zero_shot = pipeline("zero-shot", folders["zero-shot"], classes=["red_circle", "blue square"],
                         templates=templates)
    assert zero_shot.classes == ["red circle", "blue square"]  # underscores read as spaces
    model = zero_shot.model
    by_hand = []
    for name in ["red circle", "blue square"]:
        per_prompt = [model.encode_text(**tokenizer(t.format(name), max_length=64, padding="max_length", truncation=True, return_tensors="pt"))[0] for t in templates]
        by_hand.append(F.normalize(torch.stack(per_prompt).mean(0), dim=-1))
    by_hand = torch.stack(by_hand)
    torch.testing.assert_close(zero_shot.class_embeds, by_hand, atol=1e-5, rtol=1e-5)

    image_embeds = model.encode_image(pixels("retrieval", images))
    probs = (model.logit_scale.exp() * image_embeds @ by_hand.t()).softmax(-1)
    results = zero_shot(images, top_k=2)
    for row, result in zip(probs, results):
        assert {r["label"]: r["score"] for r in result} == pytest.approx(
            {"red circle": row[0].item(), "blue square": row[1].item()}, abs=1e-5)
    # classes can be swapped per call
    assert [r["label"] for r in zero_shot(images[0], ["dog"], top_k=5)] == ["dog"]
    assert zero_shot.classes == ["dog"]


def test_zero_shot_needs_classes_and_templates_with_a_slot(folders):
    zero_shot = pipeline("zero-shot", folders["zero-shot"])
    assert zero_shot.templates == list(DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="no classes"):
        zero_shot(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="must each hold"):
        ZeroShotPipeline(zero_shot.model, zero_shot.image_processor, zero_shot.tokenizer, templates=["a photo"])


def test_training_run_folder_gives_tokenizer_answers_and_text_length(tokenizer, images, tmp_path):
    """An engine checkpoint has only config.json + weights; the run.yaml beside it says the rest."""
    torch.manual_seed(0)
    run = tmp_path / "runs" / "vqa"
    model = tiny_model("vqa", tokenizer, num_labels=3)
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(tmp_path / "tok")
    root = tmp_path / "index"
    root.mkdir()
    (root / "answers.txt").write_text("".join(json.dumps({"answer": a, "label": i}) + "\n"
                                              for i, a in enumerate(["no", "yes", "blue"])))
    (run / "run.yaml").write_text(
        f"task:\n  name: vqav2\n  options:\n    tokenizer: {tmp_path / 'tok'}\n    answer2label: answers.txt\n"
        f"    max_text_len: 16\ndata:\n  root: {root}\n")
    vqa = pipeline("vqa", run / "final")
    assert vqa.labels == ["no", "yes", "blue"] and vqa.labels_source == str(root / "answers.txt")
    assert vqa.max_length == 16 and vqa.tokenizer.vocab_size == tokenizer.vocab_size
    expected = model.eval()(pixels("vqav2", images[:1]), **tokenizer("is it?", max_length=16, padding="max_length", truncation=True, return_tensors="pt")).logits.sigmoid()
    assert vqa(images[0], "is it?", top_k=1)[0]["score"] == pytest.approx(expected.max().item(), abs=1e-6)

    # a run without any tokenizer: the error says what to pass
    (run / "run.yaml").write_text("task:\n  name: vqav2\n")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        pipeline("vqa", run / "final")
    assert pipeline("vqa", run / "final", tokenizer=tmp_path / "tok").labels == ["0", "1", "2"]


def test_save_pretrained_makes_a_self_contained_folder(folders, images, tmp_path):
    classify = pipeline("classification", folders["classification"], labels=["w", "x", "y", "z"])
    classify.save_pretrained(tmp_path / "shipped")
    assert (tmp_path / "shipped" / "labels.txt").read_text() == "w\nx\ny\nz\n"
    again = pipeline("classification", tmp_path / "shipped")
    assert again.labels == ["w", "x", "y", "z"] and again(images) == classify(images)

    vqa = pipeline("vqa", folders["vqa"])
    vqa.max_length = 12
    vqa.save_pretrained(tmp_path / "vqa")
    assert pipeline("vqa", tmp_path / "vqa").max_length == 12


def test_wrong_model_kind_names_the_right_pipeline(folders):
    with pytest.raises(ValueError, match=r"model in .*captioning is a captioning model \(Beit3ForCaptioning\); task "
                       r"vqav2 needs Beit3ForVisualQuestionAnswering: use the 'captioning' pipeline.*predict caption"):
        pipeline("vqa", folders["captioning"])
    with pytest.raises(ValueError, match="unknown pipeline task 'translate'"):
        pipeline("translate", folders["vqa"])


def test_caption_settings_come_from_the_run_and_a_caption_is_never_empty(tokenizer, images, tmp_path):
    """Issue 21 item 12: the run's beams and length, and EOS held back until a word is said."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = tiny_model("captioning", tokenizer)
    with torch.no_grad():
        model.mlm_head.bias[tokenizer.eos_token_id] = 50.0  # an untrained model that would stop at once
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "run.yaml").write_text("task:\n  name: captioning\n  options:\n    num_beams: 2\n    max_text_len: 7\n"
                                  "    length_penalty: 1.0\n")
    captioner = pipeline("captioning", run / "final", device="cpu")
    assert captioner.generation == {"num_beams": 2, "max_length": 7, "length_penalty": 1.0, "min_length": 3}
    captions = captioner(images)
    assert all(c["caption"].strip() for c in captions)
    ids = captioner.model.generate(pixels("captioning", images), num_beams=2, max_length=7, length_penalty=1.0,
                                   min_length=3)
    assert captions == [{"caption": text} for text in tokenizer.batch_decode(ids)]
    assert captioner(images[0], min_length=2) == {"caption": ""}  # an empty caption only when asked for


def test_the_mask_token_comes_from_the_tokenizer(tokenizer, images, tmp_path):
    """Issue 21 item 15: a folder whose config.json lacks the mask id still loads and captions."""
    folder = tmp_path / "cap"
    torch.manual_seed(1)
    tiny_model("captioning", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["head"] = {}
    (folder / "config.json").write_text(json.dumps(meta))
    captioner = pipeline("captioning", folder, device="cpu")
    assert captioner.model.mask_token_id is None and captioner.mask_token_id == tokenizer.mask_token_id
    ids = captioner.model.generate(pixels("captioning", images), num_beams=1, max_length=6,
                                   mask_token_id=tokenizer.mask_token_id)
    assert captioner(images, num_beams=1, max_length=6) == [{"caption": t} for t in tokenizer.batch_decode(ids)]
    with pytest.raises(ValueError, match="mask token id 4000 is outside the model's vocabulary"):
        pipeline("captioning", folder, mask_token_id=4000)


def test_devices_this_machine_lacks_fail_in_one_clear_line(monkeypatch):
    """Issue 21 item 19."""
    from beit3.pipelines import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; use auto or one of: cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU on this machine; use auto or one of: cpu"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


def test_empty_questions_statements_and_top_k_below_one_are_refused(folders, images):
    """Issue 21 item 17."""
    vqa = pipeline("vqa", folders["vqa"], device="cpu")
    for question in ("", "   "):
        with pytest.raises(ValueError, match="question 1 is empty"):
            vqa(images[0], question)
    with pytest.raises(ValueError, match="question 2 is empty"):
        vqa(images[:2], ["what?", ""])
    for top_k in (0, -1):
        with pytest.raises(ValueError, match="top_k must be a whole number of at least 1"):
            vqa(images[0], "what?", top_k=top_k)
        with pytest.raises(ValueError, match="top_k must be"):
            pipeline("classification", folders["classification"])(images[0], top_k=top_k)
        with pytest.raises(ValueError, match="top_k must be"):
            pipeline("zero-shot", folders["zero-shot"], classes=["cat", "dog"])(images[0], top_k=top_k)
    with pytest.raises(ValueError, match="statement 1 is empty"):
        pipeline("nlvr2", folders["nlvr2"])((images[0], images[1]), " ")
