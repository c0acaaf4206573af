# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast runners clean

setup: $(STAMP)
	@bash scripts/setup_system.sh

# Re-install when the pinned dependencies (here or in pyproject.toml) change.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Real published models for the slow tests and benchmarks (PP-OCRv4, Apache-2.0).
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	# Silero VAD's ONNX exports (an LSTM after convs, the default file's behind If(sr); MIT).
	$(PY) -m pip install -q --no-deps silero-vad==6.2.3
	# Google's Magika file-type model (bytes in, a conv and dense layers; Apache-2.0).
	$(PY) -m pip install -q --no-deps magika==1.0.3
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/tvm-compress demo

test: setup
	$(PY) -m pytest -ra

test-fast: setup
	$(PY) -m pytest -ra -m "not slow"

clean:
	rm -rf demo-out .pytest_cache
