# Every target creates .venv in the repo root when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean-venv

$(STAMP): pyproject.toml requirements-dev.txt requirements-reference.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-reference.txt
	$(PIP) install -q fairscale==0.4.13 --no-deps
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/beit3 demo

# The whole suite, the slow end-to-end learning checks included (7-13 min on 2 cores); CI runs it.
test: $(STAMP)
	$(PY) -m pytest -q --durations=8

# Everything but the tests marked slow (~2 min): for quick iteration.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean-venv:
	rm -rf $(VENV)
