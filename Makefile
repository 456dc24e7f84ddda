# The two commands a newcomer runs:  make demo   and   make test
# Both build .venv and install the project on first use (Python 3.11 + make is all you need).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test sync nbtest pytest install clean browser

# The install is keyed on pyproject.toml's *content*, not its mtime: nbdev-export rewrites the file
# (same bytes, new mtime) on every run, so an mtime rule would reinstall on every `make test`.
install:
	@sum="$$(sha1sum pyproject.toml | cut -d' ' -f1)"; \
	if [ -x $(BIN)/python ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$sum" ]; then exit 0; fi; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || exit 1; \
	echo "installing cryptobot and its dependencies into $(VENV) (first run: ~1-3 min)"; \
	$(BIN)/python -m pip install --quiet --upgrade pip && \
	$(BIN)/python -m pip install --quiet -e ".[dev]" && \
	echo "$$sum" > $(STAMP)

demo: install
	@$(BIN)/cryptobot demo

# Notebooks, package and README in sync and clean: export + clean + README render must change nothing.
sync: install
	@snap() { git diff -- nbs cryptobot README.md | sha1sum; git status --porcelain -- nbs cryptobot README.md; }; \
	before="$$(snap)"; \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean --fname nbs || exit 1; \
	$(BIN)/jupyter nbconvert --to markdown --log-level=ERROR --stdout nbs/index.ipynb > README.md.tmp && mv README.md.tmp README.md || exit 1; \
	after="$$(snap)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev-export/nbdev-clean changed files: notebooks and cryptobot/ are out of sync (or a notebook is not clean). Run 'make sync', review 'git diff', commit."; \
	  git status --short -- nbs cryptobot README.md; exit 1; fi; \
	if [ -n "$$CI" ] && ! git diff --quiet -- nbs cryptobot README.md; then echo "FAIL: uncommitted changes in nbs/ or cryptobot/ under CI"; exit 1; fi; \
	echo "sync: notebooks and package in step"

nbtest: install
	@$(BIN)/nbdev-test --n-workers 2

# The dashboard's browser test drives Debian's Chromium through playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian chromium for the browser test (needs root or sudo; ~30 s)"
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	else echo "FAIL: chromium is missing and this user is neither root nor has sudo: install it (apt-get install chromium fonts-liberation) or run as root"; exit 1; fi; \
	{ $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; } \
	|| { echo "FAIL: could not install chromium (apt-get install chromium fonts-liberation); the browser test needs it"; exit 1; }; \
	test -x /usr/bin/chromium || { echo "FAIL: apt-get finished but /usr/bin/chromium is missing"; exit 1; }

browser: $(CHROMIUM)

# pytest on every core (at most 4; pytest-xdist). `--dist loadfile`: each test file runs on one worker (its module
# fixtures -- a trained model, an emulator, a fork server -- are built once), the SIGKILL soak files on one worker;
# tests marked `exclusive` (a timed assertion) run while no other test runs. See tests/conftest.py.
PYTEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2); echo $$(( n > 4 ? 4 : n )))
pytest: install $(CHROMIUM)
	@$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: sync nbtest pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
