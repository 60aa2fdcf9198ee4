# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The full install is about 10 GB (torch's CUDA build alone is 5.5 GB); pip's cache would keep a second copy of
# what it downloads.
export PIP_NO_CACHE_DIR := 1
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_ALL := $(VENV)/.installed-all

.PHONY: demo test lint install clean bench

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_DEMO): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[openvino,report]'
	touch $@

$(STAMP_ALL): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[all,tensorflow,dev]'
	touch $@ $(STAMP_DEMO)

install: $(STAMP_ALL)

demo: $(STAMP_DEMO)
	rm -rf demo-out
	$(VENV)/bin/edgeopt optimize examples/digits/digits_cnn.onnx --data examples/digits/test.npz -o demo-out --max-drop 0.01

test: $(STAMP_ALL)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q --durations=15 tests

lint: $(STAMP_ALL)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) demo-out build *.egg-info src/*.egg-info
