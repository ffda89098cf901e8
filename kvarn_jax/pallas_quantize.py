"""Pallas kernel: quantize rotated K/V tiles into KVarN records, one tile pair a program.

Each program loads one K and one V tile [G, D], runs the codec of `tile_math` (the
variance normalization and RTN of `kvarn.oracle`) in registers and writes the record's
fields at their byte offsets. The jnp reference is `kvarn_jax.reference.quantize`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kvarn import oracle
from kvarn.checks import check_iters, check_tiles
from kvarn_jax import tile_math

NUM_WARPS = 8  # a [128, 128] f32 tile spills to local memory with 4 warps


def _quantize_kernel(k_ref, v_ref, out_ref, *, k_bits, v_bits, iters, offsets, gpu):
    fields = tile_math.record_fields(k_ref[...], v_ref[...], k_bits, v_bits, iters, gpu=gpu)
    for value, offset in zip(fields, offsets):
        out_ref[pl.ds(offset, value.shape[0])] = value


def quantize(k_rot: jax.Array, v_rot: jax.Array, preset: str,
             iters: int = oracle.DEFAULT_ITERS, *, interpret: bool | None = None,
             num_warps: int = NUM_WARPS) -> jax.Array:
    """Rotated K, V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8.

    `interpret` defaults to True on the CPU backend (Pallas runs interpreted there).
    """
    lay = check_tiles(k_rot.shape, k_rot.dtype, v_rot.shape, v_rot.dtype, preset)
    check_iters(iters)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _quantize(k_rot, v_rot, lay, iters, interpret, num_warps)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _quantize(k_rot, v_rot, lay, iters, interpret, num_warps):
    n, g, d = k_rot.shape
    if lay.raw_bytes != lay.record_bytes:  # never for the shipped presets
        raise NotImplementedError("records with trailing padding")
    kernel = functools.partial(
        _quantize_kernel, k_bits=lay.preset.k_bits, v_bits=lay.preset.v_bits, iters=iters,
        offsets=[f.offset for f in lay.fields.values()], gpu=not interpret)
    tile_spec = pl.BlockSpec((None, g, d), lambda i: (i, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(n,),
        in_specs=[tile_spec, tile_spec],
        out_specs=pl.BlockSpec((None, lay.record_bytes), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, lay.record_bytes), jnp.uint8),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(k_rot, v_rot)
