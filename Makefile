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
	@# Headless Chromium for tests/serve/test_browser.py: only on CI or when asked, never failing the set-up.
	@if [ "$$CI" = "true" ] || [ "$$BEIT3_INSTALL_BROWSER" = "1" ]; then \
	  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	  elif ! command -v apt-get >/dev/null 2>&1; then echo "note: no apt-get here; the browser test will be skipped"; \
	  else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null ) \
	      || echo "note: installing chromium with apt-get failed; the browser test will be skipped"; fi; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/beit3 demo

# The whole suite, the slow end-to-end learning checks included; CI runs it. Two workers of one
# thread each (tests/conftest.py): 12.7 min on 2 cores (the last CI run in one process: 19.2 min).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=12

# Everything but the tests marked slow (~2 min): for quick iteration.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean-venv:
	rm -rf $(VENV)
