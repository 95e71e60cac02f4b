"""Every Python snippet in README.md and docs/ runs (tests/docs_snippets.py says how and where)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_snippets import ROOT, all_blocks

BLOCKS = all_blocks()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("docs")
    results_file = out / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_snippets.py"), str(out / "world"),
                           str(results_file)], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 or not results_file.is_file():
        pytest.fail(f"the snippet runner failed (code {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(results_file.read_text())


def test_the_docs_have_snippets():
    assert len(BLOCKS) >= 15
    assert any(doc == "README.md" for doc, _ in BLOCKS)


@pytest.mark.parametrize("doc,line", BLOCKS, ids=[f"{d}:{n}" for d, n in BLOCKS])
def test_snippet_runs(results, doc, line):
    outcome = results[f"{doc}:{line}"]
    assert outcome["ok"], f"{doc}:{line} fails:\n{outcome['error']}"


def test_readme_library_example_uses_top_level_imports():
    from tests.docs_snippets import blocks

    (first_line, code), *_ = blocks(Path(ROOT / "README.md"))
    assert "from beit3 import" in code or "import beit3\n" in code, code
