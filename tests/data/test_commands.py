import pytest

from beit3.cli import main


def test_build_prints_counts_and_problems(synthetic_world, tmp_path, capsys):
    assert main(["data", "build", "nlvr2", "--root", str(synthetic_world / "nlvr2"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nlvr2.train.index.jsonl: 120" in out and "no problems found" in out
    (synthetic_world / "imagenet" / "val" / "red_circle" / "stray.txt").write_text("x")
    try:
        assert main(["data", "build", "imagenet", "--root", str(synthetic_world / "imagenet"), "--out", str(tmp_path)]) == 0
        assert "problem: 1 x not an image file" in capsys.readouterr().out
        assert main(["data", "build", "imagenet", "--root", str(synthetic_world / "imagenet"), "--out", str(tmp_path),
                     "--strict"]) == 1
        assert "strict" in capsys.readouterr().err
    finally:
        (synthetic_world / "imagenet" / "val" / "red_circle" / "stray.txt").unlink()


def test_build_refuses_options_of_other_tasks_and_empty_roots(tmp_path, capsys):
    assert main(["data", "build", "imagenet", "--root", str(tmp_path), "--seed", "1"]) == 1
    assert "--seed does not apply to imagenet" in capsys.readouterr().err
    (tmp_path / "train" / "cat").mkdir(parents=True)
    assert main(["data", "build", "imagenet", "--root", str(tmp_path)]) == 1
    assert "points at nothing" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.parametrize("action", ["synthetic", "build"])
def test_help_has_examples(action, capsys):
    with pytest.raises(SystemExit):
        main(["data", action, "--help"])
    assert "examples:" in capsys.readouterr().out
