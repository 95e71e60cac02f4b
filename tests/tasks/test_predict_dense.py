import json

import numpy as np
import pytest
from PIL import Image

from beit3.cli import main
from beit3.config import Beit3Config
from beit3.models import Beit3ForInstanceSegmentation, Beit3ForSemanticSegmentation

TINY = Beit3Config.from_preset("tiny")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def test_predict_segmentation_draws_pngs(tmp_path, images):
    Beit3ForSemanticSegmentation(TINY, num_labels=3, out_channels=32).save_pretrained(tmp_path / "seg")
    assert main(["predict", "segmentation", str(images), "--model", str(tmp_path / "seg"), "--out", str(tmp_path / "o")]) == 0
    assert Image.open(tmp_path / "o" / "1.png").size == (50, 40)  # drawn at the original size
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len(records) == 3 and sum(records[0]["pixel_fraction"].values()) == pytest.approx(1.0, abs=1e-3)


def test_predict_detection_draws_pngs_and_checks_the_model_kind(tmp_path, images):
    model = Beit3ForInstanceSegmentation(TINY, num_labels=2, out_channels=16, min_size=32)
    model.save_pretrained(tmp_path / "det")
    (tmp_path / "names.txt").write_text("circle\nsquare\n")
    assert main(["predict", "detection", str(images / "0.jpg"), "--model", str(tmp_path / "det"),
                 "--labels", str(tmp_path / "names.txt"), "--score-threshold", "0", "--out", str(tmp_path / "o")]) == 0
    (record,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert all(d["label"] in ("circle", "square") for d in record["detections"])
    assert Image.open(tmp_path / "o" / "0.png").size == (50, 40)
    assert main(["predict", "segmentation", str(images), "--model", str(tmp_path / "det"), "--out", str(tmp_path / "x")]) == 1
    assert main(["predict", "detection", str(tmp_path / "missing"), "--model", str(tmp_path / "det"),
                 "--out", str(tmp_path / "x")]) == 1


def test_predict_segmentation_skips_bad_files_and_draws_the_rest(tmp_path, images, capsys):
    from tests.tiny_pipelines import bad_files

    bad = bad_files(images)
    Beit3ForSemanticSegmentation(TINY, num_labels=3, out_channels=32).save_pretrained(tmp_path / "seg")
    assert main(["predict", "segmentation", str(images), "--model", str(tmp_path / "seg"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert all(f"skipped {path}:" in err for name, path in bad.items() if name != "text")
    assert f"non-image file in folders ignored (e.g. {bad['text']})" in err  # by its suffix
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert len(json.loads((tmp_path / "o" / "predictions.json").read_text())) == 3


def test_read_only_out_fails_before_the_model_loads_and_recursive_enters_sub_folders(tmp_path, images, monkeypatch):
    """Issue 21 items 2 and 13."""
    import beit3.models
    from tests.faults import assert_one_line_error, read_only_dir, run_cli

    Beit3ForSemanticSegmentation(TINY, num_labels=3, out_channels=32).save_pretrained(tmp_path / "seg")
    (images / "more").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "more" / "deep.jpg")
    code, _, err = run_cli(["predict", "segmentation", images, "--model", tmp_path / "seg", "--out", tmp_path / "o",
                            "--recursive"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["0.png", "1.png", "2.png", "deep.png"]

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(beit3.models, "load_any_model", no_load)
    with read_only_dir(tmp_path) as folder:
        code, out, err = run_cli(["predict", "segmentation", images, "--model", tmp_path / "seg", "--out", folder])
    assert_one_line_error(code, err, str(folder))
