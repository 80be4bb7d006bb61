# Two entry points matter: `make demo` (the agent on the bundled demo shelf) and `make test` (the whole suite).
# Both create .venv and install what they need on a fresh Debian/Ubuntu machine with Python 3.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build 2.13.0; set TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI would
# otherwise resolve it to a multi-GB CUDA build.
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
OUT  ?= out

.PHONY: demo test lint typecheck system-deps install install-device reliability soak clean

system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends mosquitto; }
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-venv; }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Device side only: no torch (what a Jetson or store PC installs).
$(VENV)/.device-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Workstation + tests: torch first, from the pinned CPU wheel, so nothing can pull a CUDA build.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install -q -e ".[export,dev]"
	touch $@

install-device: system-deps $(VENV)/.device-installed
install: system-deps $(VENV)/.dev-installed

demo: system-deps $(VENV)/.device-installed
	$(BIN)/python -m shelfsight.shelf_agent.demo --out $(OUT)/demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Long forms of tests/reliability (CI runs the short form inside `make test`).
RELIABILITY_CYCLES ?= 10
reliability: install
	SHELFSIGHT_RELIABILITY_LONG=1 SHELFSIGHT_RELIABILITY_CYCLES=$(RELIABILITY_CYCLES) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/reliability

SOAK_MINUTES ?= 30
soak: install
	$(BIN)/python tests/reliability/soak.py --minutes $(SOAK_MINUTES) --out $(OUT)/soak

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy export runtime shelf_agent calibration sim

clean:
	rm -rf $(OUT) build *.egg-info
