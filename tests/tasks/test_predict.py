"""`beit3 predict caption|vqa|classify|nlvr2|zero-shot`: files in, JSON / CSV / table out."""
from __future__ import annotations

import csv
import json

import pytest

from beit3.cli import build_parser, main
from beit3.pipelines import pipeline
from tests.tiny_pipelines import bad_files, save_model_folders, tiny_tokenizer, write_images

KINDS = ("caption", "vqa", "classify", "nlvr2", "zero-shot", "detection", "segmentation")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    return save_model_folders(tokenizer, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three good images and the four bad files next to them."""
    folder = tmp_path_factory.mktemp("photos")
    good = write_images(folder, 3)
    return folder, good, bad_files(folder)


def test_caption_reports_each_bad_file_and_captions_the_rest(folders, photos, tmp_path, capsys):
    folder, good, bad = photos
    out = tmp_path / "captions.json"
    assert main(["predict", "caption", "--model", str(folders["captioning"]), str(folder),
                 "--num-beams", "2", "--max-length", "6", "--output", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3  # the text file in the folder is ignored by its suffix, and counted
    assert f"1 non-image file in folders ignored (e.g. {bad['text']})" in captured.err
    reasons = {"corrupt": "truncated", "huge": "exceeds limit", "empty": "empty (0 bytes)"}
    for name, reason in reasons.items():
        (line,) = [line for line in skipped if line.startswith(f"skipped {bad[name]}:")]
        assert reason in line
    written = json.loads(out.read_text())
    assert written["task"] == "caption" and {s["file"] for s in written["skipped"]} == {str(bad[n]) for n in reasons}
    expected = pipeline("captioning", folders["captioning"])(good, num_beams=2, max_length=6)
    assert written["predictions"] == [{"image": str(p), **e} for p, e in zip(good, expected)]
    assert str(good[2]) in captured.out.splitlines()[-1]  # the table lists every image


def test_nothing_readable_is_an_error_that_says_so(folders, photos, capsys):
    _, _, bad = photos
    args = ["predict", "classify", "--model", str(folders["classification"])]
    assert main(args + [str(p) for p in bad.values()]) == 1
    assert "nothing was predicted: all 4 input(s) were skipped" in capsys.readouterr().err
    assert main(args + ["no/such/photo.jpg"]) == 1
    err = capsys.readouterr().err
    assert "skipped no/such/photo.jpg: no such file or folder" in err and "nothing was predicted" in err


def test_vqa_csv_has_a_row_per_image_question_and_rank(folders, photos, tmp_path):
    folder, good, _ = photos
    answers = tmp_path / "answer2label.txt"
    answers.write_text("".join(json.dumps({"answer": a, "label": i}) + "\n" for i, a in enumerate("abcd")))
    out = tmp_path / "answers.csv"
    assert main(["predict", "vqa", "--model", str(folders["vqa"]), "--answers", str(answers), "--top-k", "2",
                 "--question", "what colour?", "--question", "is it red?", *map(str, good), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["image", "question", "rank", "answer", "score"]
    assert len(rows) == 3 * 2 * 2
    vqa = pipeline("vqa", folders["vqa"], labels=answers)
    expected = vqa(good, "is it red?", top_k=2)
    got = [r for r in rows if r["question"] == "is it red?"]
    assert [(r["image"], r["answer"]) for r in got] == [(str(p), e["answer"]) for p, ranked in zip(good, expected)
                                                         for e in ranked]
    assert [float(r["score"]) for r in got] == pytest.approx([e["score"] for ranked in expected for e in ranked])


def test_classify_table_names_the_classes(folders, photos, tmp_path, capsys):
    _, good, _ = photos
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\nfish\n")
    assert main(["predict", "classify", "--model", str(folders["classification"]), "--labels", str(names),
                 "--top-k", "1", "--batch-size", "2", str(good[0]), str(good[1]), str(good[2])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "labels"] and len(lines) == 2 + 3
    assert all(line.split()[1] in ("cat", "dog", "bird", "fish") for line in lines[2:])


def test_nlvr2_one_pair_and_a_pairs_file_with_a_missing_image(folders, photos, tmp_path, capsys):
    _, good, _ = photos
    assert main(["predict", "nlvr2", "--model", str(folders["nlvr2"]), "--statement", "two dogs",
                 str(good[0]), str(good[1])]) == 0
    assert "two dogs" in capsys.readouterr().out

    (tmp_path / "a.png").write_bytes(good[0].read_bytes())
    (tmp_path / "b.png").write_bytes(good[1].read_bytes())
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("left,right,statement\na.png,b.png,two dogs\na.png,gone.png,one cat\nb.png,a.png,a square\n")
    out = tmp_path / "judged.json"
    assert main(["predict", "nlvr2", "--model", str(folders["nlvr2"]), "--pairs", str(pairs),
                 "--output", str(out), "--batch-size", "2"]) == 0
    assert f"skipped {tmp_path / 'gone.png'}: image file not found" in capsys.readouterr().err
    predictions = json.loads(out.read_text())["predictions"]
    assert [p["statement"] for p in predictions] == ["two dogs", "a square"]
    judge = pipeline("nlvr2", folders["nlvr2"])
    expected = judge([(good[1], good[0])], ["a square"])[0]
    assert predictions[1]["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert predictions[1]["true"] == expected["true"]

    assert main(["predict", "nlvr2", "--model", str(folders["nlvr2"]), "--statement", "x", str(good[0])]) == 1
    assert "exactly two images" in capsys.readouterr().err
    (tmp_path / "wrong.csv").write_text("image,text\n")
    assert main(["predict", "nlvr2", "--model", str(folders["nlvr2"]), "--pairs", str(tmp_path / "wrong.csv")]) == 1
    assert "needs the columns left,right,statement" in capsys.readouterr().err


def test_zero_shot_evaluates_a_class_folder(folders, tmp_path, capsys):
    classes = tmp_path / "val"
    write_images(classes / "red_circle", 2, seed=1)
    write_images(classes / "blue_square", 3, seed=2)
    (classes / "blue_square" / "notes.txt").write_text("not a picture")
    out = tmp_path / "zero_shot.json"
    assert main(["predict", "zero-shot", "--model", str(folders["zero-shot"]), "--classes", str(classes),
                 "--evaluate", "--top-k", "1", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 non-image file in folders ignored" in captured.err and "notes.txt" in captured.err
    written = json.loads(out.read_text())
    assert written["classes"] == ["blue square", "red circle"]
    predictions = written["predictions"]
    assert len(predictions) == 5 and all(len(p["labels"]) == 1 for p in predictions)
    assert [p["true_label"] for p in predictions] == ["blue square"] * 3 + ["red circle"] * 2
    top1 = 100 * sum(p["labels"][0]["label"] == p["true_label"] for p in predictions) / 5
    assert written["metrics"] == {"images": 5, "top1_accuracy": pytest.approx(top1), "top5_accuracy": 100.0}
    assert f"top-1 {top1:.2f} %" in captured.out

    # the same scores as the pipeline, with names from a text file and custom templates
    names, templates = tmp_path / "names.txt", tmp_path / "prompts.txt"
    names.write_text("blue_square\nred_circle\n")
    templates.write_text("a photo of a {}.\n{} drawn\n")
    table = tmp_path / "zero_shot.csv"
    image = classes / "red_circle" / "0.png"
    assert main(["predict", "zero-shot", "--model", str(folders["zero-shot"]), "--classes", str(names),
                 "--templates", str(templates), str(image), "--output", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    zero_shot = pipeline("zero-shot", folders["zero-shot"], classes=["blue square", "red circle"],
                         templates=["a photo of a {}.", "{} drawn"])
    expected = zero_shot(image)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert [float(r["score"]) for r in rows] == pytest.approx([e["score"] for e in expected])

    templates.write_text("a photo\n")
    assert main(["predict", "zero-shot", "--model", str(folders["zero-shot"]), "--classes", str(names),
                 "--templates", str(templates), str(image)]) == 1
    assert "every template needs {}" in capsys.readouterr().err
    assert main(["predict", "zero-shot", "--model", str(folders["zero-shot"]), "--classes", str(names),
                 "--evaluate"]) == 1
    assert "--evaluate needs --classes to be a folder" in capsys.readouterr().err


def test_errors_say_what_to_do(folders, photos, tmp_path, capsys):
    _, good, _ = photos
    assert main(["predict", "caption", "--model", str(folders["captioning"]), str(good[0]),
                 "--output", str(tmp_path / "out.txt")]) == 1
    assert "use a .json or .csv file name" in capsys.readouterr().err
    assert main(["predict", "caption", "--model", str(folders["vqa"]), str(good[0])]) == 1
    assert "beit3 predict vqa" in capsys.readouterr().err
    assert main(["predict", "vqa", "--model", str(folders["vqa"]), "--question", "q", str(good[0])]) == 0
    assert "no label names found" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_help_with_examples(kind, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["predict", kind, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"beit3 predict {kind}" in text


def test_caption_uses_the_runs_beam_settings_and_says_which(tokenizer, photos, tmp_path):
    """Issue 21 items 12, 15: defaults from run.yaml beside the model; --min-length; --mask-token-id."""
    from tests.faults import run_cli
    from tests.tiny_pipelines import save_model_folder

    _, good, _ = photos
    folder = save_model_folder("captioning", tokenizer, tmp_path / "run" / "final")
    (tmp_path / "run" / "run.yaml").write_text("task:\n  options:\n    num_beams: 2\n    max_decode_len: 6\n")
    out = tmp_path / "captions.json"
    code, _, err = run_cli(["predict", "caption", "--model", folder, good[0], "--output", out, "--device", "cpu"])
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["generation"] == {"num_beams": 2, "max_length": 6, "length_penalty": 0.6, "min_length": 3}
    expected = pipeline("captioning", folder)(good[0], num_beams=2, max_length=6)
    assert written["predictions"][0]["caption"] == expected["caption"] != ""
    code, _, err = run_cli(["predict", "caption", "--model", folder, good[0], "--output", out, "--min-length", "4",
                            "--num-beams", "1", "--mask-token-id", str(tokenizer.mask_token_id)])
    assert code == 0, err
    assert json.loads(out.read_text())["generation"] == {"num_beams": 1, "max_length": 6, "length_penalty": 0.6,
                                                         "min_length": 4}
    code, _, err = run_cli(["predict", "caption", "--model", folder, good[0], "--mask-token-id", "999"])
    last = err.strip().splitlines()[-1]
    assert code == 1 and "mask token id 999 is outside the model's vocabulary" in last


def test_bad_text_top_k_and_device_fail_in_one_line_before_any_work(folders, photos, tmp_path, monkeypatch):
    """Issue 21 items 17, 19: empty questions / statements, a device this machine lacks."""
    import torch

    import beit3.pipelines
    from tests.faults import assert_one_line_error, run_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    _, good, _ = photos
    monkeypatch.setattr(beit3.pipelines, "load_model", no_load)
    code, _, err = run_cli(["predict", "vqa", "--model", folders["vqa"], "--question", "what?", "--question", " ",
                            good[0]])
    assert_one_line_error(code, err, "--question is empty (number 2 of 2)")
    code, _, err = run_cli(["predict", "nlvr2", "--model", folders["nlvr2"], "--statement", "", good[0], good[1]])
    assert_one_line_error(code, err, "--statement is empty")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"left,right,statement\n{good[0]},{good[1]},two dogs\n{good[0]},{good[1]},\n")
    code, _, err = run_cli(["predict", "nlvr2", "--model", folders["nlvr2"], "--pairs", pairs])
    assert_one_line_error(code, err, f"the statement is empty in {pairs}, row 2")
    code, _, err = run_cli(["predict", "classify", "--model", folders["classification"], "--top-k", "0", good[0]])
    assert_one_line_error(code, err, "--top-k must be at least 1")
    code, _, err = run_cli(["predict", "classify", "--model", folders["classification"], "--device", "tpu", good[0]])
    assert_one_line_error(code, err, "unknown device 'tpu'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["predict", "caption", "--model", folders["captioning"], "--device", "cuda", good[0]])
    assert_one_line_error(code, err, "device cuda asked for, but PyTorch sees no CUDA GPU")


def test_recursive_enters_sub_folders(folders, tmp_path):
    """Issue 21 item 13: sub-folders only with --recursive."""
    from tests.faults import run_cli

    top = write_images(tmp_path / "photos", 2)
    deep = write_images(tmp_path / "photos" / "more", 1, seed=3)
    out = tmp_path / "labels.json"
    args = ["predict", "classify", "--model", folders["classification"], tmp_path / "photos", "--output", out]
    code, _, err = run_cli(args)
    assert code == 0, err
    assert [p["image"] for p in json.loads(out.read_text())["predictions"]] == [str(p) for p in top]
    code, _, err = run_cli(args + ["--recursive"])
    assert code == 0, err
    assert sorted(p["image"] for p in json.loads(out.read_text())["predictions"]) == sorted(map(str, top + deep))


def test_output_in_a_read_only_folder_fails_at_the_start(folders, photos, tmp_path, monkeypatch):
    """Issue 21 item 2: no model is loaded, no image read."""
    import beit3.pipelines
    from tests.faults import assert_one_line_error, read_only_dir, run_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(beit3.pipelines, "load_model", no_load)
    _, good, _ = photos
    with read_only_dir(tmp_path) as folder:
        code, out, err = run_cli(["predict", "classify", "--model", folders["classification"], good[0],
                                  "--output", folder / "labels.csv"])
    assert_one_line_error(code, err, str(folder))
    assert out == ""
