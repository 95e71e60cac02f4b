import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (make test): one thread per worker process and per process it starts, so two
    # workers share the two cores instead of four threads fighting over them (docs/training.md).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """Print what the slow learning tests reached, so a CI log records the scores, not just a pass."""
    lines = [value for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
             if report.when == "call" for name, value in report.user_properties if name == "learned"]
    if lines:
        terminalreporter.write_sep("-", "learned from scratch on the synthetic world")
        for line in lines:
            terminalreporter.write_line(line)
