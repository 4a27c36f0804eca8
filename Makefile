# Two entry points for newcomers: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .[dev]
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) tools/demo.py --output-dir outputs/demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
