"""The public KVarN codec for JAX: picks the Pallas kernels on a GPU, the jnp reference
elsewhere; both give the oracle's bytes where they are picked.

The jnp reference is exact only where XLA keeps every multiply and add separate: on the
CPU with `--xla_cpu_max_isa=AVX` (set by `import kvarn_jax`). XLA:GPU contracts them into
FMAs, so on a GPU the exact path is the Pallas kernels (measured on an H100: the jnp
reference differs from the oracle in up to 2.5% of the bytes of a record).
"""

from __future__ import annotations

import jax

from kvarn import oracle
from kvarn_jax import pallas_quantize, pallas_rotate, reference

IMPLS = ("auto", "reference", "pallas")


def _use_pallas(impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl == "pallas" or (impl == "auto" and jax.default_backend() == "gpu")


def rotate(x: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Rotate the last axis (head_dim) by the normalized Hadamard matrix; same dtype out."""
    return pallas_rotate.rotate(x) if _use_pallas(impl) else reference.rotate(x)


def unrotate(x: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Inverse of `rotate`: the normalized Hadamard matrix is symmetric and orthonormal,
    so this is the same transform."""
    return rotate(x, impl=impl)


def quantize(k_rot: jax.Array, v_rot: jax.Array, preset: str,
             iters: int = oracle.DEFAULT_ITERS, *, impl: str = "auto") -> jax.Array:
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    if _use_pallas(impl):
        return pallas_quantize.quantize(k_rot, v_rot, preset, iters)
    return reference.quantize(k_rot, v_rot, preset, iters)


def dequantize(records: jax.Array, preset: str, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Records [N, record_bytes] -> K, V [N, G, D] float32, in the rotated frame."""
    return reference.dequantize(records, preset, head_dim)
