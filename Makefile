# Two entry points for newcomers: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all lint setup clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .[dev]
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/blsam-demo --output-dir outputs/demo

# fast tier: tiny architectures, about 3 minutes on 2 CPU cores (172 s measured)
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# everything: fast tier + full-width models, torchrun and precision (what CI runs)
test-all: setup
	$(PY) -m pytest -q --durations=15 tests

# ruff.toml: pyflakes, pycodestyle, import sorting, bugbear, pyupgrade; run by .ci/run
lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs
