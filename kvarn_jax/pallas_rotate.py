"""Pallas kernel: normalized Hadamard rotation along the head dimension.

Each program rotates BLOCK_ROWS vectors of D channels with log2(D) butterfly stages and
stores them in the input dtype (what the tail pool holds). The jnp reference is
`kvarn_jax.reference.rotate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kvarn.checks import check_rotate_input
from kvarn_jax import tile_math

BLOCK_ROWS = 32
NUM_WARPS = 4


def _rotate_kernel(x_ref, o_ref):
    o_ref[...] = tile_math.rotate_rows(x_ref[...])


def rotate(x: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Rotate the last axis of x (fp16/bf16/fp32) by the normalized Hadamard matrix."""
    check_rotate_input(x.shape, x.dtype)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _rotate(x, interpret)


@functools.partial(jax.jit, static_argnums=(1,))
def _rotate(x, interpret):
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    padded = -(-m // BLOCK_ROWS) * BLOCK_ROWS  # 0.11 Pallas does not mask edge blocks
    rows = jnp.pad(rows, ((0, padded - m), (0, 0)))
    spec = pl.BlockSpec((BLOCK_ROWS, d), lambda i: (i, 0))
    out = pl.pallas_call(
        _rotate_kernel,
        grid=(padded // BLOCK_ROWS,),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(rows.shape, x.dtype),
        compiler_params=pltr.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
    )(rows)
    return out[:m].reshape(x.shape)
