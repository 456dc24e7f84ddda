# The two commands a newcomer runs:  make demo   and   make test
# Both build .venv and install the project on first use (Python 3.11 + make is all you need).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test sync nbtest pytest install clean browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing cryptobot and its dependencies into $(VENV) (first run: ~1-3 min)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(BIN)/cryptobot demo

# Notebooks, package and README in sync and clean: export + clean + README render must change nothing.
sync: $(STAMP)
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

nbtest: $(STAMP)
	@$(BIN)/nbdev-test --n-workers 2

# The dashboard's browser test drives Debian's Chromium through playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian chromium for the browser test (needs root; ~30 s)"
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	{ $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; } \
	|| { echo "FAIL: could not install chromium (apt-get install chromium fonts-liberation); the browser test needs it"; exit 1; }

browser: $(CHROMIUM)

pytest: $(STAMP) $(CHROMIUM)
	@$(BIN)/python -m pytest -q

test: sync nbtest pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
