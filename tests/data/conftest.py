from pathlib import Path

import pytest
from PIL import Image


def make_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A tiny real image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory) -> Path:
    """The small synthetic world with its indexes, generated once for all tests."""
    from beit3.data.synthetic import generate

    out = tmp_path_factory.mktemp("world")
    generate(out, size="small", seed=0)
    return out
