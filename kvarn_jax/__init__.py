"""KVarN for JAX: the jnp reference and Pallas kernels of the tile codec.

XLA on the CPU contracts `a * b + c` into fused multiply-adds unless
`--xla_cpu_max_isa=AVX` is set before jax is imported; the CPU paths need it to give the
oracle's bytes, so importing `kvarn_jax` first sets it.
"""

import os
import sys
import warnings

_EXACT_CPU_FLAG = "--xla_cpu_max_isa=AVX"
if _EXACT_CPU_FLAG not in os.environ.get("XLA_FLAGS", ""):
    if "jax" in sys.modules:
        warnings.warn(
            f"jax was imported before kvarn_jax without XLA_FLAGS={_EXACT_CPU_FLAG}: CPU "
            "results may differ from the oracle in the last bit (fused multiply-adds). "
            "Import kvarn_jax first or set the flag.", stacklevel=2)
    else:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _EXACT_CPU_FLAG).strip()

from kvarn_jax.codec import dequantize, quantize, rotate, unrotate  # noqa: E402

__all__ = ["dequantize", "quantize", "rotate", "unrotate"]
