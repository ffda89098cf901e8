"""The KVarN tile codec as traceable JAX functions on one tile.

These functions are the body of the Pallas kernels and, vmapped over tiles, the jnp
reference: one copy of the arithmetic, written in the op order of `kvarn.oracle` (the
specification). They only use ops that both XLA and the Pallas Triton lowering accept
and that round the same way on both: elementwise IEEE ops, split-and-add pairwise
trees, max/min reductions, integer ops, floor-based rounding.

`gpu=True` selects correctly rounded inline-PTX division and square root (plain `/` and
`sqrt` are approximate in Pallas on the GPU); `gpu=False` uses XLA's, which are IEEE on
the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvarn import oracle

F32 = jnp.float32


def div_rn(x: jax.Array, y: jax.Array, *, gpu: bool) -> jax.Array:
    """Correctly rounded x / y."""
    x, y = jnp.broadcast_arrays(x, y)
    if not gpu:
        # XLA rewrites a division by a broadcast or a constant into a multiply by the
        # reciprocal (not correctly rounded); the barrier hides the divisor from it.
        return x / lax.optimization_barrier(y)
    from jax.experimental.pallas import triton as pltr

    return pltr.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;", args=[x, y], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)],
    )[0]


def sqrt_rn(x: jax.Array, *, gpu: bool) -> jax.Array:
    if not gpu:
        return jnp.sqrt(x)
    from jax.experimental.pallas import triton as pltr

    return pltr.elementwise_inline_asm(
        "sqrt.rn.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)],
    )[0]


def pair_sum_last(x: jax.Array) -> jax.Array:
    """Canonical pairwise tree over the last axis, kept with length 1.

    Split-and-add, never size-2 `sum`s: XLA on the CPU merges a chain of small reduces
    into one reduce with its own order.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    while n > 1:
        a, b = jnp.split(x.reshape(*lead, n // 2, 2), 2, axis=-1)
        x = (a + b).reshape(*lead, n // 2)
        n //= 2
    return x.reshape(*lead, 1)


def canonicalize(x: jax.Array) -> jax.Array:
    x = x.astype(F32)
    x = jnp.where(x != x, F32(0), x)  # NaN
    x = jnp.minimum(jnp.maximum(x, -oracle.FP16_MAX), oracle.FP16_MAX)
    return jnp.where(jnp.abs(x) < oracle.TINY_INPUT, F32(0), x)


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """Nearest-even cast saturating at dtype's finite range, -0 -> +0."""
    dtype = jnp.dtype(dtype)
    if dtype != F32:
        hi = np.float32(float(jnp.finfo(dtype).max))
        x = jnp.minimum(jnp.maximum(x, -hi), hi)
    y = x.astype(dtype)
    return jnp.where(y == 0, jnp.zeros((), dtype), y)


def fwht_last(x: jax.Array) -> jax.Array:
    """Unnormalized Sylvester Walsh-Hadamard transform along the last axis of [R, D]:
    stage h pairs i with i + h inside each block of 2h (a, b -> a + b, a - b)."""
    rows, d = x.shape
    h = 1
    while h < d:
        blocks = d // (2 * h)
        a, b = jnp.split(x.reshape(rows, blocks, 2, h), 2, axis=2)
        a, b = a.reshape(rows, blocks, h), b.reshape(rows, blocks, h)
        y = jnp.stack([a + b, a - b], axis=-1)  # [R, blocks, h, 2]
        x = jnp.transpose(y, (0, 1, 3, 2)).reshape(rows, d)
        h *= 2
    return x


def rotate_rows(x: jax.Array) -> jax.Array:
    """Normalized Hadamard rotation of each row of [R, D]; same dtype out."""
    d = x.shape[-1]
    y = fwht_last(canonicalize(x)) * np.float32(1.0 / np.sqrt(d))
    return to_storage(y, x.dtype)


def std_last(x: jax.Array, *, gpu: bool) -> jax.Array:
    """Two-pass sample std (Bessel-corrected) along the last axis, kept with length 1."""
    n = x.shape[-1]
    mean = pair_sum_last(x) * np.float32(1.0 / n)
    d = x - mean
    return sqrt_rn(pair_sum_last(d * d) * np.float32(1.0 / (n - 1)), gpu=gpu)


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def rescale(x: jax.Array, rc: jax.Array, rr: jax.Array, flush: bool) -> jax.Array:
    """Y = X * rcp(c)[col] * rcp(r)[row] with the reciprocals given; flush below normal
    (`flush` False: the caller knows nothing gets there, see `record_fields`)."""
    y = (x * rc) * rr
    if not flush:
        return y
    return jnp.where(jnp.abs(y) < oracle.F32_MIN_NORMAL, F32(0), y)


def _ratio(s: jax.Array, *, gpu: bool) -> jax.Array:
    hi = jnp.maximum(jnp.max(s), oracle.IMB_FLOOR)
    lo = jnp.maximum(jnp.min(s), oracle.IMB_FLOOR)
    return div_rn(hi.reshape(1, 1), lo.reshape(1, 1), gpu=gpu)


def _stats(y: jax.Array, *, gpu: bool):
    """(column std [1, C], row std [R, 1], imbalance [1, 1]) of Y [R, C]."""
    s_col = std_last(y.T, gpu=gpu).reshape(1, y.shape[1])
    s_row = std_last(y, gpu=gpu)
    return s_col, s_row, _ratio(s_col, gpu=gpu) + _ratio(s_row, gpu=gpu)


def normalize(x: jax.Array, iters: int, flush: bool, *, gpu: bool):
    """Variance normalization of X [R, C]: (c [1, C], r [R, 1]) of the most balanced
    iterate, the identity included, ties going to the later one."""
    rows, cols = x.shape
    one = F32(1)
    c, r = jnp.ones((1, cols), F32), jnp.ones((rows, 1), F32)
    s_col, _, imb = _stats(x, gpu=gpu)

    def step(_, carry):  # rr: rcp(r), carried over
        c, r, rr, s_col, best, best_c, best_r = carry
        c = _clamp(c * _clamp(s_col, oracle.STD_MIN, oracle.STD_MAX),
                   oracle.SCALE_MIN, oracle.SCALE_MAX)
        rc = div_rn(one, c, gpu=gpu)
        y = rescale(x, rc, rr, flush)
        r = _clamp(r * _clamp(std_last(y, gpu=gpu), oracle.STD_MIN, oracle.STD_MAX),
                   oracle.SCALE_MIN, oracle.SCALE_MAX)
        rr = div_rn(one, r, gpu=gpu)
        y = rescale(x, rc, rr, flush)
        s_col, _, imb = _stats(y, gpu=gpu)
        keep = imb <= best
        return (c, r, rr, s_col, jnp.where(keep, imb, best),
                jnp.where(keep, c, best_c), jnp.where(keep, r, best_r))

    carry = lax.fori_loop(0, iters, step, (c, r, r, s_col, imb, c, r))
    return carry[5], carry[6]


def round_half_even(v: jax.Array) -> jax.Array:
    """Nearest-even integer of 0 <= v < 2**22 from floor and compares (int32)."""
    f = jnp.floor(v)
    frac = v - f  # exact
    fi = f.astype(jnp.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fi & 1) == 1))
    return fi + up.astype(jnp.int32)


def pack_last(q: jax.Array, bits: int) -> jax.Array:
    """[R, C] int codes -> [R * C * bits // 8] uint8, LSB first along the last axis.
    Bit fields are disjoint, so the integer sum is an OR and its order is free."""
    rows, cols = q.shape
    per = 8 // bits
    shifts = lax.broadcasted_iota(jnp.uint32, (rows, cols // per, per), 2) * np.uint32(bits)
    words = q.astype(jnp.uint32).reshape(rows, cols // per, per) << shifts
    return jnp.sum(words, axis=-1).astype(jnp.uint8).reshape(rows * cols // per)


def fp16_bytes(x: jax.Array) -> jax.Array:
    """[n] float32 -> [2n] uint8: saturating fp16, little-endian."""
    u = lax.bitcast_convert_type(to_storage(x, jnp.float16), jnp.uint16)
    lo = (u & np.uint16(0xFF)).astype(jnp.uint8)
    hi = (u >> np.uint16(8)).astype(jnp.uint8)
    return jnp.stack([lo, hi], axis=-1).reshape(2 * x.shape[0])


def quantize_rows(x: jax.Array, bits: int, iters: int, flush: bool, *, gpu: bool):
    """Quantize X [R, C] along its rows: (packed codes, a [2R], z [2R], c [2C]) as bytes."""
    rows, cols = x.shape
    c, r = normalize(x, iters, flush, gpu=gpu)
    one = F32(1)
    b = rescale(x, div_rn(one, c, gpu=gpu), div_rn(one, r, gpu=gpu), flush)
    lo = jnp.min(b, axis=1, keepdims=True)
    hi = jnp.max(b, axis=1, keepdims=True)
    delta = jnp.maximum((hi - lo) * np.float32(1.0 / ((1 << bits) - 1)), oracle.DELTA_MIN)
    v = div_rn(b - lo, delta, gpu=gpu)
    q = jnp.minimum(round_half_even(v), (1 << bits) - 1)
    return (pack_last(q, bits), fp16_bytes((r * delta).reshape(rows)),
            fp16_bytes((r * lo).reshape(rows)), fp16_bytes(c.reshape(cols)))


def record_fields(k_tile: jax.Array, v_tile: jax.Array, k_bits: int, v_bits: int,
                  iters: int, *, gpu: bool) -> list[jax.Array]:
    """Rotated K and V tiles [G, D] -> the record's fields as byte vectors, in order."""
    flush = oracle.rescale_can_underflow(k_tile.dtype.name)  # K and V share a dtype
    kc, a_k, z_k, tau_k = quantize_rows(canonicalize(k_tile).T, k_bits, iters, flush, gpu=gpu)
    vc, a_v, z_v, sigma_v = quantize_rows(canonicalize(v_tile), v_bits, iters, flush, gpu=gpu)
    return [kc, a_k, z_k, tau_k, vc, sigma_v, a_v, z_v]
