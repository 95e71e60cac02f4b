import json
from pathlib import Path

import pytest

from beit3.data.builders import build_captioning, build_imagenet, build_nlvr2, build_retrieval, build_vqa, read_answer2label
from beit3.data.index import DataError, EmptyDatasetError, IndexFormatError, read_jsonl, resolve_image_path

from .conftest import make_image


def karpathy_entry(filepath, filename, split, captions, cocoid):
    return {"filepath": filepath, "filename": filename, "split": split, "cocoid": cocoid,
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    images = [
        karpathy_entry("train2014", "a.jpg", "train", ["A red circle.", "red ball"], 11),
        karpathy_entry("val2014", "b.jpg", "restval", ["blue square"], 12),
        karpathy_entry("val2014", "c.jpg", "val", ["green", "yellow"], 13),
        karpathy_entry("val2014", "d.jpg", "test", ["white"], 14),
        karpathy_entry("val2014", "missing.jpg", "test", ["never seen"], 15),
        karpathy_entry("val2014", "e.jpg", "test", ["  ", "purple"], 16),
    ]
    for entry in images:
        if entry["filename"] != "missing.jpg":
            make_image(root / entry["filepath"] / entry["filename"])
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_coco_retrieval_counts_and_running_image_ids(coco_root, tmp_path):
    out = tmp_path / "index"
    report = build_retrieval(coco_root, out, dataset="coco")
    train = read_jsonl(out / "coco_retrieval.train.jsonl")
    # train = train + restval, one row per caption, image ids count images within the split
    assert [(r["text"], r["image_id"]) for r in train] == [("A red circle.", 0), ("red ball", 0), ("blue square", 1)]
    assert resolve_image_path(out / "x", train[0]["image_path"]).resolve() == (coco_root / "train2014/a.jpg").resolve()
    test = read_jsonl(out / "coco_retrieval.test.jsonl")
    assert [(r["text"], r["image_id"]) for r in test] == [("white", 0), ("purple", 1)]
    assert report.counts == {"coco_retrieval.train.jsonl": 3, "coco_retrieval.val.jsonl": 2, "coco_retrieval.test.jsonl": 2}
    assert report.problems == {"missing image": 1, "empty caption": 1}
    assert "missing.jpg" in report.summary()


def test_coco_captioning_rows(coco_root, tmp_path):
    out = tmp_path / "index"
    build_captioning(coco_root, out)
    train = read_jsonl(out / "coco_captioning.train.jsonl")
    assert [(r["text"], r["image_id"]) for r in train] == [("A red circle.", 11), ("red ball", 11), ("blue square", 12)]
    val = read_jsonl(out / "coco_captioning.val.jsonl")
    assert val == [{"image_path": "../coco/val2014/c.jpg", "text": None, "image_id": 13, "references": ["green", "yellow"]}]


def test_strict_turns_problems_into_errors(coco_root, tmp_path):
    with pytest.raises(DataError, match="missing image"):
        build_retrieval(coco_root, tmp_path / "index", strict=True)
    assert not (tmp_path / "index").exists()


def test_flickr30k(tmp_path):
    root = tmp_path / "flickr"
    images = [{"filename": f"{n}.jpg", "split": split, "sentences": [{"raw": f"caption {n}"}]}
              for n, split in enumerate(["train", "train", "val", "test"])]
    for entry in images:
        make_image(root / "flickr30k-images" / entry["filename"])
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    report = build_retrieval(root, root, dataset="flickr30k")
    assert report.counts == {"flickr30k.train.jsonl": 2, "flickr30k.val.jsonl": 1, "flickr30k.test.jsonl": 1}
    assert read_jsonl(root / "flickr30k.train.jsonl")[1] == {"image_path": "flickr30k-images/1.jpg", "text": "caption 1", "image_id": 1}


def test_refuses_an_index_pointing_at_nothing(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    entry = karpathy_entry("train2014", "gone.jpg", "train", ["a caption"], 1)
    (root / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(EmptyDatasetError, match="points at nothing"):
        build_retrieval(root, tmp_path / "index")
    assert not list((tmp_path).glob("index/*.jsonl"))


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "dataset_coco.json").write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(IndexFormatError, match=r"dataset_coco.json:2"):
        build_retrieval(tmp_path, tmp_path)
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"filename": "a.jpg"}]}))
    with pytest.raises(IndexFormatError, match=r"images\[0\]: missing field\(s\) filepath, split, sentences"):
        build_retrieval(tmp_path, tmp_path)


def write_vqa(root: Path, *, val_images: int = 4) -> None:
    """Train: 10 questions answered "2" or "yes"; val: ``val_images`` images with one question each."""
    questions = {"train2014": [], "val2014": [], "test2015": []}
    annotations = {"train2014": [], "val2014": []}

    def add(subset, image_id, qid, multiple_choice, raw_answers, answer_type=None):
        make_image(root / subset / f"COCO_{subset}_{image_id:012d}.jpg")
        questions[subset].append({"image_id": image_id, "question": f"question {qid}?", "question_id": qid})
        if subset in annotations:
            annotation = {"question_id": qid, "image_id": image_id, "multiple_choice_answer": multiple_choice,
                          "answers": [{"answer": a, "answer_id": n} for n, a in enumerate(raw_answers)]}
            if answer_type:  # official files always have it; val here leaves it out to test its absence
                annotation["answer_type"] = answer_type
            annotations[subset].append(annotation)

    for qid in range(5):
        add("train2014", 1, qid, "two", ["2"] * 7 + ["two", "3", "3"], "number")
        add("train2014", 2, 10 + qid, "Yes", ["yes"] * 10, "yes/no")
    add("train2014", 3, 20, "rare", ["rare"] * 10)  # answer seen once: not in the vocabulary, question dropped
    for n in range(val_images):
        add("val2014", 100 + n, 100 + n, "2", ["2", "2", "yes"] + ["maybe"] * 7)
    add("test2015", 500, 500, None, [])
    (root / "vqa").mkdir(parents=True, exist_ok=True)
    for subset, rows in questions.items():
        (root / "vqa" / f"v2_OpenEnded_mscoco_{subset}_questions.json").write_text(json.dumps({"questions": rows}))
    for subset, rows in annotations.items():
        (root / "vqa" / f"v2_mscoco_{subset}_annotations.json").write_text(json.dumps({"annotations": rows}))


def test_vqa_vocabulary_scores_and_splits(tmp_path):
    root = tmp_path / "coco"
    write_vqa(root)
    report = build_vqa(root, root, min_answer_count=5, rest_val_images=1, seed=0)
    # "two" (5 train + 4 val) normalises to "2", first seen before "yes"; "rare" is seen once.
    assert read_answer2label(root / "answer2label.txt") == {"2": 0, "yes": 1}
    train = read_jsonl(root / "vqa.train.jsonl")
    assert len(train) == 10
    first = train[0]
    assert first["text"] == "question 0?" and first["qid"] == 0 and first["image_path"] == "train2014/COCO_train2014_000000000001.jpg"
    # 8 annotators say 2 ("two" normalised), none say yes: label 0 with score 1.0
    assert dict(zip(first["labels"], first["scores"])) == {0: 1.0}
    val = read_jsonl(root / "vqa.val.jsonl")
    assert dict(zip(val[0]["labels"], val[0]["scores"])) == {0: 0.6, 1: 0.3}
    rest, trainable = read_jsonl(root / "vqa.rest_val.jsonl"), read_jsonl(root / "vqa.trainable_val.jsonl")
    assert len(rest) == 1 and len(trainable) == 3
    assert {r["qid"] for r in rest} | {r["qid"] for r in trainable} == {r["qid"] for r in val}
    test = read_jsonl(root / "vqa.test.jsonl")
    assert test[0]["qid"] == 500 and "labels" not in test[0]
    assert any("1 train questions dropped" in note for note in report.notes)
    assert any("test-dev" in note for note in report.notes)  # the optional file is absent


def test_vqa_rows_keep_the_raw_annotator_answers_and_answer_type(tmp_path):
    root = tmp_path / "coco"
    write_vqa(root)
    build_vqa(root, root, min_answer_count=5, rest_val_images=1)
    first = read_jsonl(root / "vqa.train.jsonl")[0]
    # as typed, not normalised: the official accuracy normalises them itself
    assert first["raw_answers"] == ["2"] * 7 + ["two", "3", "3"]
    assert first["answer_type"] == "number"
    val = read_jsonl(root / "vqa.rest_val.jsonl")[0]
    assert val["raw_answers"] == ["2", "2", "yes"] + ["maybe"] * 7
    assert "answer_type" not in val  # the annotation file has none
    assert "raw_answers" not in read_jsonl(root / "vqa.test.jsonl")[0]


def test_vqa_split_is_reproducible_by_seed(tmp_path):
    root = tmp_path / "coco"
    write_vqa(root, val_images=12)

    def rest_qids(seed, out):
        build_vqa(root, out, min_answer_count=5, rest_val_images=4, seed=seed)
        return sorted(r["qid"] for r in read_jsonl(out / "vqa.rest_val.jsonl"))

    assert rest_qids(0, tmp_path / "a") == rest_qids(0, tmp_path / "b")
    assert len({tuple(rest_qids(seed, tmp_path / f"s{seed}")) for seed in range(5)}) > 1
    with pytest.raises(DataError, match="--rest-val-images"):
        build_vqa(root, tmp_path / "c", min_answer_count=5, rest_val_images=12)


def test_vqa_legacy_matches_raw_answers(tmp_path):
    root = tmp_path / "coco"
    write_vqa(root)
    build_vqa(root, root, min_answer_count=5, rest_val_images=1, legacy=True)
    first = read_jsonl(root / "vqa.train.jsonl")[0]
    assert dict(zip(first["labels"], first["scores"])) == {0: 1.0}  # 7 x "2"; "two" no longer counts (still >= 4)


def write_nlvr2(root: Path, lines: list[str]) -> None:
    (root / "nlvr2" / "data").mkdir(parents=True, exist_ok=True)
    (root / "nlvr2" / "data" / "train.json").write_text("\n".join(lines) + "\n")


def test_nlvr2(tmp_path):
    root = tmp_path / "nlvr"
    for side in (0, 1):
        make_image(root / "images/train/7" / f"train-10-0-img{side}.png")
        make_image(root / "dev" / f"dev-3-1-img{side}.png")
    write_nlvr2(root, [json.dumps({"identifier": "train-10-0-0", "sentence": "one dog", "label": "True", "directory": 7}),
                       json.dumps({"identifier": "train-10-0-1", "sentence": "two dogs", "label": "False", "directory": 7}),
                       json.dumps({"identifier": "train-11-0-0", "sentence": "gone", "label": "False", "directory": 7})])
    (root / "nlvr2/data/dev.json").write_text(json.dumps({"identifier": "dev-3-1-2", "sentence": "x", "label": "True"}))
    report = build_nlvr2(root, root)
    train = read_jsonl(root / "nlvr2.train.index.jsonl")
    assert train[0] == {"image_path": "images/train/7/train-10-0-img0.png", "image2_path": "images/train/7/train-10-0-img1.png",
                        "text": "one dog", "label": 1, "identifier": "train-10-0-0"}
    assert [r["label"] for r in train] == [1, 0]
    assert read_jsonl(root / "nlvr2.dev.index.jsonl")[0]["image2_path"] == "dev/dev-3-1-img1.png"
    assert report.problems["missing image"] == 2  # both images of train-11-0
    assert any("test1.json not found" in note for note in report.notes)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"identifier": "train-1-0-0", "sentence": "s", "directory": 1}), "missing field"),
    (json.dumps({"identifier": "train-1-0-0", "sentence": "s", "label": "maybe", "directory": 1}), "label must be"),
])
def test_nlvr2_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"identifier": "train-1-0-0", "sentence": "s", "label": "True", "directory": 1})
    write_nlvr2(tmp_path, [good, line])
    with pytest.raises(IndexFormatError, match=rf"train.json:2: {message}"):
        build_nlvr2(tmp_path, tmp_path)


def test_imagenet_class_folders(tmp_path):
    root = tmp_path / "imagenet"
    for split, names in (("train", ["cat", "ant", "bee"]), ("val", ["bee", "ant", "zebra"])):
        for name in names:
            make_image(root / split / name / f"{name}1.JPEG")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    report = build_imagenet(root, root)
    assert (root / "imagenet.classes.txt").read_text().split() == ["ant", "bee", "cat"]
    train = read_jsonl(root / "imagenet.train.index.jsonl")
    assert [(r["image_path"], r["label"]) for r in train] == [("train/ant/ant1.JPEG", 0), ("train/bee/bee1.JPEG", 1), ("train/cat/cat1.JPEG", 2)]
    assert [r["label"] for r in read_jsonl(root / "imagenet.val.index.jsonl")] == [0, 1]
    assert report.problems == {"not an image file": 1, "class folder not in train": 1}


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its scan: Image.verify() accepts it, decoding it fails."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_verify_images_decodes_in_full_and_rejects_a_truncated_jpeg(coco_root, tmp_path):
    bad = truncated_jpeg(coco_root / "val2014" / "c.jpg")
    report = build_retrieval(coco_root, tmp_path / "plain")
    assert report.counts["coco_retrieval.val.jsonl"] == 2  # without --verify-images only existence is checked
    report = build_retrieval(coco_root, tmp_path / "verified", verify_images=True)
    assert report.problems["unreadable image"] == 1 and "coco_retrieval.val.jsonl" not in report.counts
    assert str(bad) in report.summary() and "truncated" in report.summary()
    assert [r["image_id"] for r in read_jsonl(tmp_path / "verified" / "coco_retrieval.test.jsonl")] == [0, 1]


def test_a_build_whose_write_fails_leaves_the_previous_index(coco_root, tmp_path, monkeypatch):
    import errno

    from beit3.data.builders import common

    out = tmp_path / "index"
    build_retrieval(coco_root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (coco_root / "dataset_coco.json").write_text((coco_root / "dataset_coco.json").read_text().replace("white", "black"))
    synced = []

    def full_on_the_second_file(path):
        synced.append(path)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common, "fsync_file", full_on_the_second_file)
    with pytest.raises(OSError) as err:
        build_retrieval(coco_root, out)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out / "coco_retrieval.val.jsonl")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first file was not replaced alone
    monkeypatch.undo()
    build_retrieval(coco_root, out)
    assert "black" in (out / "coco_retrieval.test.jsonl").read_text()


def test_a_long_build_shows_progress_lines_in_a_log(tmp_path, monkeypatch, capsys):
    from beit3.data.builders import common

    root = tmp_path / "coco"
    write_vqa(root)
    monkeypatch.setattr(common, "PROGRESS_INTERVAL", 0.0)  # a line per item instead of every 30 s
    build_vqa(root, root, min_answer_count=5, rest_val_images=1)
    lines = capsys.readouterr().err.splitlines()
    assert "vqav2: train questions: 1/11 (9%)" in lines and "vqav2: train questions: 11/11 (100%)" in lines
    assert "vqav2: val questions: 4/4 (100%)" in lines
