import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from beit3.cli import main
from beit3.config import Beit3Config
from beit3.models import Beit3ForImageTextRetrieval
from beit3.processing import Beit3ImageProcessor, Beit3Tokenizer
from beit3.tasks import search
from beit3.tasks.search import ImageIndex, exact_top_k, faiss_available
from tests.faults import bomb_png

SPM = Path(__file__).parents[1] / "processing" / "data" / "bpe_external.model"


def save_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    Beit3ForImageTextRetrieval(Beit3Config.from_preset("tiny")).save_pretrained(folder)
    Beit3Tokenizer(SPM).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model"), seed=0)


def save_noise(path: Path, seed: int, size=(30, 20)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i in range(3):
        save_noise(folder / f"{i}.png", seed=i, size=(20 + 7 * i, 30 + 5 * i))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "trip" / "red.jpg")
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")
    (folder / ".hidden.png").write_bytes(b"")  # hidden: ignored
    return folder


def reference_embeddings(model_dir: Path, paths) -> torch.Tensor:
    model = Beit3ForImageTextRetrieval.from_pretrained(model_dir).eval()
    pixels = Beit3ImageProcessor(model.config.image_size, "vl")([str(p) for p in paths])
    with torch.no_grad():
        return model.encode_image(pixels["pixel_values"])


def count_embedded(index: ImageIndex) -> list[int]:
    """Batch sizes of every image-tower call from now on."""
    calls: list[int] = []
    encode = index.encoder.model.encode_image
    index.encoder.model.encode_image = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    return calls


def test_index_stores_encode_image_embeddings_with_a_manifest(tmp_path, model_dir, photos):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    report = index.update([photos], recursive=True, batch_size=3, progress=False)

    expected_paths = sorted(str(p) for p in [*photos.glob("?.png"), photos / "trip" / "red.jpg"])
    assert sorted(report.added) == expected_paths and report.skipped == []
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    manifest = [json.loads(line) for line in (tmp_path / "idx" / meta["manifest"]).read_text().splitlines()]
    assert [row["path"] for row in manifest] == expected_paths
    assert manifest[0]["size"] == os.stat(expected_paths[0]).st_size
    assert manifest[0]["mtime_ns"] == os.stat(expected_paths[0]).st_mtime_ns
    stored = load_file(tmp_path / "idx" / meta["embeddings"])["embeddings"]
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, reference_embeddings(model_dir, expected_paths), atol=1e-5, rtol=1e-5)
    assert meta["model"]["path"] == str(model_dir) and len(meta["model"]["sha256"]) == 64

    reopened = ImageIndex(tmp_path / "idx")  # from disk, the model found through the index
    torch.testing.assert_close(reopened.embeddings, stored)
    assert [r.path for r in reopened.records] == expected_paths


def test_an_indexed_image_finds_itself_first_with_score_one(tmp_path, model_dir, photos):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    index.update([photos], recursive=True, progress=False)
    for path in [photos / "1.png", photos / "trip" / "red.jpg"]:
        hits = index.search_image(path, k=3)
        assert hits[0].path == str(path) and hits[0].rank == 1
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].score >= hits[1].score >= hits[2].score


def test_text_query_scores_are_the_cosine_similarities(tmp_path, model_dir, photos):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    index.update([photos], recursive=True, progress=False)
    hits = index.search_text("a red square", k=10)

    model = Beit3ForImageTextRetrieval.from_pretrained(model_dir).eval()
    tokens = Beit3Tokenizer.from_pretrained(model_dir)(["a red square"], max_length=64, padding="max_length", truncation=True, return_tensors="pt")
    paths = [r.path for r in index.records]
    with torch.no_grad():
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
    expected = reference_embeddings(model_dir, paths) @ text
    assert len(hits) == 4  # k is capped at the collection size
    assert [h.path for h in hits] == [paths[i] for i in expected.argsort(descending=True)]
    assert [h.score for h in hits] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)


def test_exact_top_k_in_chunks_equals_a_full_sort():
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.8, -0.6]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # query 0 scores 1, .6, 0, -1, .8 ; query 1 scores 0, .8, 1, 0, -.6
    for chunk_rows in (1, 2, 5, 100):
        scores, rows = exact_top_k(embeddings, queries, k=3, chunk_rows=chunk_rows)
        assert rows.tolist() == [[0, 4, 1], [2, 1, 0]] or rows.tolist() == [[0, 4, 1], [2, 1, 3]]
        torch.testing.assert_close(scores, torch.tensor([[1.0, 0.8, 0.6], [1.0, 0.8, 0.0]]))


def test_reindexing_embeds_only_new_and_changed_files(tmp_path, model_dir, photos):
    ImageIndex(tmp_path / "idx", model=model_dir).update([photos], recursive=True, progress=False)

    index = ImageIndex(tmp_path / "idx")
    calls = count_embedded(index)
    report = index.update(progress=False)  # nothing changed: the recorded folder is refreshed
    assert calls == [] and report.unchanged == 4 and report.added == report.changed == report.removed == []

    save_noise(photos / "trip" / "new.png", seed=10)
    save_noise(photos / "0.png", seed=11, size=(25, 25))  # same name, new content
    os.remove(photos / "2.png")
    report = index.update(progress=False)
    assert sum(calls) == 2
    assert report.added == [str(photos / "trip" / "new.png")] and report.changed == [str(photos / "0.png")]
    assert report.removed == [str(photos / "2.png")] and report.unchanged == 2

    reopened = ImageIndex(tmp_path / "idx")
    by_path = dict(zip((r.path for r in reopened.records), reopened.embeddings))
    expected_paths = sorted(str(p) for p in [photos / "0.png", photos / "1.png", photos / "trip" / "new.png",
                                             photos / "trip" / "red.jpg"])
    assert sorted(by_path) == expected_paths
    reference = reference_embeddings(model_dir, expected_paths)
    torch.testing.assert_close(torch.stack([by_path[p] for p in expected_paths]), reference, atol=1e-5, rtol=1e-5)
    assert reopened.search_image(photos / "0.png", k=1)[0].path == str(photos / "0.png")
    assert len(list((tmp_path / "idx").glob("embeddings.*"))) == 1  # older generations are deleted


def test_an_interrupted_run_keeps_its_progress_and_the_rerun_resumes(tmp_path, model_dir, photos):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    encode = index.encoder.model.encode_image
    calls = []

    def interrupted_on_second_batch(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(pixels)

    index.encoder.model.encode_image = interrupted_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        index.update([photos], recursive=True, batch_size=2, progress=False)
    assert len(ImageIndex(tmp_path / "idx")) == 2  # the first batch was saved on the way out

    index = ImageIndex(tmp_path / "idx")
    calls = count_embedded(index)
    report = index.update(progress=False)
    assert calls == [2] and report.unchanged == 2 and len(report.added) == 2 and len(index) == 4


def test_bad_files_are_reported_skipped_and_retried_only_once_changed(tmp_path, model_dir, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = save_noise(folder / "good.png", seed=0)
    truncated = save_noise(folder / "truncated.jpg", seed=1, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello, I am not a JPEG")
    bomb_png(folder / "huge.png", 20000, 20000)

    index = ImageIndex(tmp_path / "idx", model=model_dir)
    calls = count_embedded(index)
    report = index.update([folder], batch_size=2, progress=False)

    assert [r.path for r in index.records] == [str(good)] and sum(calls) == 1
    assert report.added == [str(good)]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    for name, why in [("truncated.jpg", "truncated"), ("empty.png", "empty"), ("text.jpg", "not an image"),
                      ("huge.png", "pixels")]:
        (line,) = [line for line in lines if name in line]
        assert str(folder / name) in line and why in line
    assert sorted(s.record.path for s in report.skipped) == sorted(str(folder / n) for n in
                                                                   ["truncated.jpg", "empty.png", "text.jpg", "huge.png"])

    report = ImageIndex(tmp_path / "idx").update(progress=False)  # unchanged bad files are not read again
    assert report.skipped == [] and report.skipped_before == 4 and capsys.readouterr().err == ""

    save_noise(folder / "empty.png", seed=5)  # fixed
    index = ImageIndex(tmp_path / "idx")
    calls = count_embedded(index)
    report = index.update(progress=False)
    assert sum(calls) == 1 and report.added == [str(folder / "empty.png")] and report.skipped_before == 3
    assert sorted(r.path for r in index.records) == [str(folder / "empty.png"), str(good)]


def test_another_model_is_an_error_naming_both(tmp_path, photos):
    model = save_model(tmp_path / "model", seed=0)
    ImageIndex(tmp_path / "idx", model=model).update([photos], recursive=True, progress=False)
    other = save_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError) as err:
        ImageIndex(tmp_path / "idx", model=other)
    assert f"built with model '{model}'" in str(err.value) and f"not with '{other}'" in str(err.value)
    assert f"beit3 search index --model {other}" in str(err.value)

    save_model(model, seed=2)  # retrained in place: same path, other weights
    with pytest.raises(ValueError, match=f"the model at '{model}' has changed since"):
        ImageIndex(tmp_path / "idx").search_text("red")


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_an_interrupted_save_leaves_the_previous_index(tmp_path, model_dir, photos, monkeypatch, failing_write):
    ImageIndex(tmp_path / "idx", model=model_dir).update([photos], recursive=True, progress=False)
    before = ImageIndex(tmp_path / "idx")
    save_noise(photos / "late.png", seed=20)
    os.remove(photos / "1.png")

    real_write = search.atomic_write
    writes = []

    def crash_midway(path, write):
        writes.append(path)
        if len(writes) == failing_write:  # the temporary file is half written when the "crash" comes
            def half(tmp):
                write(tmp)
                Path(tmp).write_bytes(Path(tmp).read_bytes()[:20])
                raise OSError("disk full")
            return real_write(path, half)
        return real_write(path, write)

    monkeypatch.setattr(search, "atomic_write", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ImageIndex(tmp_path / "idx").update(progress=False)
    monkeypatch.undo()

    after = ImageIndex(tmp_path / "idx")
    assert after.records == before.records
    torch.testing.assert_close(after.embeddings, before.embeddings)
    assert after.search_image(photos / "0.png", k=1)[0].path == str(photos / "0.png")
    assert not list((tmp_path / "idx").glob("*.tmp-*"))
    after.update(progress=False)  # the next run completes the update
    assert str(photos / "late.png") in {r.path for r in after.records}


def test_faiss_backend_matches_exact_or_says_how_to_install_it(tmp_path, model_dir, photos):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    index.update([photos], recursive=True, progress=False)
    exact = index.search_text("red", k=3, backend="exact")
    if faiss_available():
        hits = index.search_text("red", k=3, backend="faiss")
        assert [h.path for h in hits] == [h.path for h in exact]
        assert [h.score for h in hits] == pytest.approx([h.score for h in exact], abs=1e-5)
    else:
        with pytest.raises(ValueError, match="pip install faiss-cpu.*--backend exact"):
            index.search_text("red", k=3, backend="faiss")
        # auto falls back to the exact search, whatever the threshold
        assert index.search_text("red", k=3, backend="auto", faiss_threshold=1) == exact


def test_cli_index_and_query_with_table_json_and_csv(tmp_path, model_dir, photos, capsys):
    idx = str(tmp_path / "idx")
    assert main(["search", "index", "--model", str(model_dir), "--index", idx, str(photos), "--recursive",
                 "--workers", "0", "--no-progress", "--device", "cpu"]) == 0
    assert "4 images (4 added" in capsys.readouterr().out

    query = photos / "trip" / "red.jpg"
    assert main(["search", "query", "--index", idx, "--image", str(query), "--text", "a red square", "-k", "2",
                 "--output", str(tmp_path / "hits.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text: a red square" in out and f"image: {query}" in out and "rank" in out
    records = json.loads((tmp_path / "hits.json").read_text())
    assert [r["kind"] for r in records] == ["text", "image"] and all(len(r["hits"]) == 2 for r in records)
    assert records[1]["hits"][0]["path"] == str(query) and records[1]["hits"][0]["score"] == pytest.approx(1, abs=1e-5)

    assert main(["search", "query", "--index", idx, "--text", "red", "--output", str(tmp_path / "hits.csv"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "hits.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"] and rows[0]["kind"] == "text"


def test_cli_errors_say_what_to_do(tmp_path, model_dir, capsys):
    assert main(["search", "query", "--index", str(tmp_path / "none"), "--text", "x"]) == 1
    err = capsys.readouterr().err
    assert f"no index at '{tmp_path / 'none'}'" in err and "beit3 search index --model" in err
    assert main(["search", "index", "--model", str(model_dir), "--index", str(tmp_path / "i"),
                 str(tmp_path / "missing"), "--no-progress"]) == 1
    assert "no such image file or folder" in capsys.readouterr().err
    for action in ("index", "query"):
        with pytest.raises(SystemExit):
            main(["search", action, "--help"])
        assert "examples:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- hardening
def test_folders_are_listed_like_predict_and_sub_folders_need_recursive(tmp_path, model_dir, photos, capsys):
    index = ImageIndex(tmp_path / "idx", model=model_dir)
    report = index.update([photos], progress=False)  # not recursive: trip/ is counted, not entered
    assert sorted(report.added) == sorted(str(p) for p in photos.glob("?.png"))
    err = capsys.readouterr().err
    assert "1 non-image file in folders ignored" in err and str(photos / "notes.txt") in err
    assert "1 sub-folder not entered" in err and "pass --recursive" in err

    red = photos / "trip" / "red.jpg"
    report = ImageIndex(tmp_path / "idx").update([photos], recursive=True, progress=False)
    assert report.added == [str(red)] and "sub-folder" not in capsys.readouterr().err
    # a refresh (no folder given) lists the root recursively, as it was added
    save_noise(photos / "trip" / "new.png", seed=3)
    report = ImageIndex(tmp_path / "idx").update(progress=False)
    assert report.added == [str(photos / "trip" / "new.png")] and report.unchanged == 4
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["recursive_roots"] == [str(photos)]


def test_a_training_run_folder_finds_the_tokenizer_its_run_yaml_names(tmp_path, capsys):
    from beit3.training.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    tokenizer = tmp_path / "tokenizer"
    Beit3Tokenizer(SPM).save_pretrained(tokenizer)
    run = tmp_path / "runs" / "coco_retrieval"
    final = run / "final"
    torch.manual_seed(0)
    Beit3ForImageTextRetrieval(Beit3Config.from_preset("tiny")).save_pretrained(final)  # no tokenizer in it
    config = load_config(configs / "tiny_retrieval.yaml", [f"task.options.tokenizer={tokenizer}",
                                                           f"train.output_dir={run}"])
    (run / "run.yaml").write_text(config.to_yaml())
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (24, 24), (200, 0, 0)).save(photos / "red.png")

    idx = str(tmp_path / "idx")
    assert main(["search", "index", "--model", str(final), "--index", idx, str(photos), "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    assert main(["search", "query", "--index", idx, "--text", "a red square", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text: a red square" in out and str(photos / "red.png") in out


def test_embeddings_get_the_default_permissions(tmp_path, model_dir, photos):
    umask = os.umask(0o022)
    try:
        ImageIndex(tmp_path / "idx", model=model_dir).update([photos], progress=False)
    finally:
        os.umask(umask)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    for name in (meta["embeddings"], meta["manifest"], "index.json"):
        assert (tmp_path / "idx" / name).stat().st_mode & 0o777 == 0o644, name


def test_a_damaged_manifest_or_index_file_is_named_with_its_line(tmp_path, model_dir, photos):
    ImageIndex(tmp_path / "idx", model=model_dir).update([photos], progress=False)
    meta_file = tmp_path / "idx" / "index.json"
    manifest = tmp_path / "idx" / json.loads(meta_file.read_text())["manifest"]
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    with pytest.raises(ValueError) as err:
        ImageIndex(tmp_path / "idx")
    assert str(err.value).startswith(f"{manifest}:2: not valid JSON") and "beit3 search index" in str(err.value)

    meta_file.write_text(meta_file.read_text().replace('"count"', '"count" oops', 1))
    with pytest.raises(ValueError) as err:
        ImageIndex(tmp_path / "idx")
    line = meta_file.read_text().splitlines().index(next(li for li in meta_file.read_text().splitlines()
                                                         if "oops" in li)) + 1
    assert str(err.value).startswith(f"{meta_file}:{line}: not valid JSON")


def test_a_deleted_folder_is_dropped_from_the_roots_and_said_so(tmp_path, model_dir, photos, capsys):
    other = tmp_path / "other"
    other.mkdir()
    save_noise(other / "a.png", seed=7)
    ImageIndex(tmp_path / "idx", model=model_dir).update([photos, other], progress=False)
    (other / "a.png").unlink()
    other.rmdir()
    capsys.readouterr()

    assert main(["search", "index", "--index", str(tmp_path / "idx"), "--no-progress", "--workers", "0",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"indexed folder '{other}' no longer exists: its 1 images are dropped and it is removed" in captured.err
    assert "removed from the index: " + str(other) in captured.out and "1 removed" in captured.out
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["roots"] == [str(photos)]
    assert main(["search", "index", "--index", str(tmp_path / "idx"), "--no-progress", "--device", "cpu"]) == 0
    assert "no longer exists" not in capsys.readouterr().err  # said once, not on every refresh


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, model_dir, photos, capsys):
    code = main(["search", "index", "--model", str(model_dir), "--index", str(tmp_path / "idx"), str(photos),
                 "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("beit3 search: error:") and "cuda" in err and "cpu" in err
    assert not (tmp_path / "idx").exists()  # refused before anything was made


def test_the_one_image_lister_of_predict_and_search(tmp_path, capsys):
    from beit3.data import files
    from beit3.tasks import predict_io

    assert predict_io.list_images is files.list_images and predict_io.InputReport is files.InputReport
    folder = tmp_path / "in"
    for name in ("b.png", "a.JPG", "notes.txt", "scan.dat", ".hidden.png", "sub/c.png", "sub/deeper/d.webp",
                 "other/e.bmp"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    named = tmp_path / "named.dat"  # named explicitly: taken whatever its suffix
    named.write_bytes(b"x")

    report = files.InputReport()
    listed = files.list_images([named, folder, tmp_path / "gone.png"], report)
    assert listed == [named, folder / "a.JPG", folder / "b.png"]
    assert sorted(report.ignored) == [str(folder / "notes.txt"), str(folder / "scan.dat")]
    assert sorted(report.not_entered) == [str(folder / "other"), str(folder / "sub")]
    assert report.skipped == [{"file": str(tmp_path / "gone.png"), "reason": "no such file or folder"}]
    err = capsys.readouterr().err
    assert "2 non-image files in folders ignored" in err
    assert "2 sub-folders not entered" in err and "pass --recursive to include them" in err

    report = files.InputReport()
    listed = files.list_images([folder], report, recursive=True)
    assert listed == sorted([folder / "a.JPG", folder / "b.png", folder / "other" / "e.bmp", folder / "sub" / "c.png",
                             folder / "sub" / "deeper" / "d.webp"])
    assert report.not_entered == [] and "sub-folder" not in capsys.readouterr().err
