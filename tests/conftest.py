"""Test setup: exact CPU arithmetic for XLA before jax loads, shared fixtures."""

import kvarn_jax  # noqa: F401  (sets XLA_FLAGS=--xla_cpu_max_isa=AVX before jax is imported)
import kvarn_torch  # noqa: F401  (chooses Triton's interpreter without a GPU before any test
#                   module imports vLLM, which imports Triton)
