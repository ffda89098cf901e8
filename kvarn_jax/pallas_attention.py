"""Pallas kernel: attention over a paged KVarN cache (decode and multi-query rows).

Grid (batch, kv_head, split). A program owns every query row of one KV head's GQA group
(all Sq x Hq/Hk rows, padded to a power of two >= 16 for tensor-core dots) and walks its
share of the sequence's blocks: a block still in the tail pool is read as stored
(rotated, model dtype); a quantized block is read from its record and dequantized in
registers, with the per-channel K scale folded into q and the per-token V scale into p,
so the codes themselves go straight into the dots:

    s  = ((q * a_K) @ codes_K + q @ z_K) * tau_K
    pv = ((p * a_V) @ codes_V + p @ z_V) * sigma_V

A code c enters the dot as 1 + c / 2**bits, built in the mantissa of 1.0 (no int ->
float conversion); the constant comes back out with the zero point's row sum.

Online softmax (base 2) per split, then a log-sum-exp merge of the splits in plain JAX.
The query is rotated in and the output rotated back outside the kernel. The exact
reference is `kvarn_jax.attention_reference.attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kvarn.format import Layout, layout
from kvarn_jax import reference
from kvarn_jax.cache import KVarNCache

MIN_ROWS = 16  # tensor-core dots need M >= 16
NUM_WARPS = 4
TARGET_PROGRAMS = 1056  # 8 programs per SM of an H100: enough warps to hide load latency
MIN_BLOCKS_PER_SPLIT = 2
MASK = -0.7 * float(np.finfo(np.float32).max)
LOG2E = 1.4426950408889634
F32 = jnp.float32


def _fp16_field(ref, blk, h, offset: int, n: int):
    """n little-endian fp16 values of a record, as float32."""
    raw = ref[blk, h, pl.ds(offset, 2 * n)].astype(jnp.uint16).reshape(n, 2)
    lo, hi = jnp.split(raw, 2, axis=-1)
    u = (lo | (hi << 8)).reshape(n)
    return lax.bitcast_convert_type(u, jnp.float16).astype(F32)


# (bit pattern of 1.0, mantissa bits) of the dot operand dtypes
_ONE_BITS = {jnp.dtype(jnp.float16): (0x3C00, 10), jnp.dtype(jnp.bfloat16): (0x3F80, 7)}


def _codes(ref, blk, h, offset: int, rows: int, cols: int, bits: int, dtype):
    """[rows, cols] codes c of a record field packed LSB-first along cols, as the `dtype`
    value 1 + c / 2**bits: the code or-ed into the top of 1.0's mantissa, no int -> float
    conversion (see `_code_dot` for the 1 and the 2**bits)."""
    per = 8 // bits
    one, mantissa = _ONE_BITS[jnp.dtype(dtype)]
    top = mantissa - bits  # code j of a byte moves to bit `top`: one shift per code
    w = ref[blk, h, pl.ds(offset, rows * cols // per)].astype(jnp.uint32) << np.uint32(top)
    w = jnp.broadcast_to(w.reshape(rows, cols // per, 1), (rows, cols // per, per))
    shifts = lax.broadcasted_iota(jnp.uint32, (rows, cols // per, per), 2) * np.uint32(bits)
    x = ((w >> shifts) & np.uint32(((1 << bits) - 1) << top)) | np.uint32(one)
    x = x.astype(jnp.uint16)
    return lax.bitcast_convert_type(x.reshape(rows, cols), dtype)


def _code_dot(y, scale, zero, codes, bits: int):
    """sum_j y[r, j] * (scale[j] * c[j, n] + zero[j]) for y [R, J] float32 and codes
    [J, N] = 1 + c / 2**bits: the dot's constant 1 comes back out of the zero point's
    row sum, against the same rounded operand."""
    ys = (y * scale[None, :]).astype(codes.dtype)
    dot = pltr.dot(ys, codes).astype(F32)
    bias = jnp.sum(y * zero[None, :] - ys.astype(F32) * (1 << bits), axis=1, keepdims=True)
    return dot * (1 << bits) + bias


def _attention_kernel(bt_ref, lens_ref, qlens_ref, b2s_ref, q_ref, pages_ref, pk_ref, pv_ref,
                      o_ref, l_ref, m_ref, *, lay: Layout, group: int, blocks_per_split: int,
                      causal: bool):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, d, p = lay.preset.tile, lay.head_dim, lay.preset
    f = lay.fields
    q = q_ref[...]  # [R, D] rotated, scaled, model dtype
    rows = q.shape[0]
    dt = q.dtype
    seq_len = lens_ref[b]
    row_pos = seq_len - qlens_ref[b] + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
    limit = row_pos + 1 if causal else jnp.full((rows, 1), seq_len, jnp.int32)
    n_blocks = (seq_len + g - 1) // g
    start = split * blocks_per_split
    stop = jnp.minimum(start + blocks_per_split, n_blocks)

    def block(j, carry):
        acc, l, m = carry
        blk = bt_ref[b, j]
        slot = b2s_ref[blk]

        def pool_scores():
            k = pk_ref[slot, :, h, :]  # [G, D]
            return pltr.dot(q, k, trans_b=True).astype(F32)

        def record_scores():
            a_k = _fp16_field(pages_ref, blk, h, f["a_k"].offset, d)
            z_k = _fp16_field(pages_ref, blk, h, f["z_k"].offset, d)
            tau = _fp16_field(pages_ref, blk, h, f["tau_k"].offset, g)
            codes = _codes(pages_ref, blk, h, f["k_codes"].offset, d, g, p.k_bits, dt)
            return _code_dot(q.astype(F32), a_k, z_k, codes, p.k_bits) * tau[None, :]

        s = lax.cond(slot >= 0, pool_scores, record_scores)  # [R, G]
        pos = j * g + lax.broadcasted_iota(jnp.int32, (1, g), 1)
        s = jnp.where(pos < limit, s, MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m - m_new)
        prob = jnp.exp2(s - m_new)
        l = alpha * l + jnp.sum(prob, axis=1, keepdims=True)

        def pool_values():
            v = pv_ref[slot, :, h, :]  # [G, D]
            return pltr.dot(prob.astype(dt), v).astype(F32)

        def record_values():
            sigma = _fp16_field(pages_ref, blk, h, f["sigma_v"].offset, d)
            a_v = _fp16_field(pages_ref, blk, h, f["a_v"].offset, g)
            z_v = _fp16_field(pages_ref, blk, h, f["z_v"].offset, g)
            codes = _codes(pages_ref, blk, h, f["v_codes"].offset, g, d, p.v_bits, dt)
            return _code_dot(prob, a_v, z_v, codes, p.v_bits) * sigma[None, :]

        acc = alpha * acc + lax.cond(slot >= 0, pool_values, record_values)
        return acc, l, m_new

    init = (jnp.zeros((rows, d), F32), jnp.zeros((rows, 1), F32), jnp.full((rows, 1), MASK, F32))
    acc, l, m = lax.fori_loop(start, stop, block, init)
    o_ref[...] = acc
    l_ref[...] = l
    m_ref[...] = m


def num_splits(batch: int, kv_heads: int, max_blocks: int) -> int:
    """Split the context only when batch x heads leaves the GPU short of programs."""
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(want, max_blocks // MIN_BLOCKS_PER_SPLIT))


def attention(q: jax.Array, cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
              query_lens: jax.Array | None = None, *, causal: bool = True,
              softmax_scale: float | None = None, splits: int | None = None,
              interpret: bool | None = None) -> jax.Array:
    """q [B, Sq, Hq, D] (Sq = 1: decode; Sq > 1: the last query_lens[b] tokens of each
    sequence, already appended) -> out [B, Sq, Hq, D] in q's dtype.

    block_tables [B, M] int32 physical block ids; seq_lens [B] int32 (tokens in the cache,
    the query rows included); query_lens [B] (default Sq). `splits` defaults to an
    automatic split-KV choice."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    if d != cache.head_dim or hq % hk:
        raise ValueError(f"q must be [B, Sq, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"{hk} KV heads; got {q.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B={b}, M] and seq_lens [B]; got "
                         f"{block_tables.shape}, {seq_lens.shape}")
    if query_lens is None:
        query_lens = jnp.full((b,), sq, jnp.int32)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    splits = splits or num_splits(b, hk, block_tables.shape[1])
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    return _attention(q, cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
                      query_lens.astype(jnp.int32), causal, float(scale), splits, interpret)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _attention(q, cache, block_tables, seq_lens, query_lens, causal, scale, splits, interpret):
    b, sq, hq, d = q.shape
    hk, group = cache.num_kv_heads, hq // cache.num_kv_heads
    rows = max(MIN_ROWS, 1 << math.ceil(math.log2(sq * group)))
    lay = layout(cache.preset, d)
    dt = cache.pool_k.dtype
    # Rotated, pre-scaled query rows of each KV head: row = token * group + head in group.
    qr = reference.rotate(q.astype(F32)) * np.float32(scale * LOG2E)  # softmax in base 2
    qr = qr.reshape(b, sq, hk, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, sq * group, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - sq * group), (0, 0))).astype(dt)
    bps = -(-block_tables.shape[1] // splits)

    kernel = functools.partial(_attention_kernel, lay=lay, group=group, blocks_per_split=bps,
                               causal=causal)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    part = lambda *shape: pl.BlockSpec((None, None, None, *shape),  # noqa: E731
                                       lambda i, j, s: (i, j, s) + (0,) * len(shape))
    out_shapes = [jax.ShapeDtypeStruct((b, hk, splits, rows, d), F32),
                  jax.ShapeDtypeStruct((b, hk, splits, rows, 1), F32),
                  jax.ShapeDtypeStruct((b, hk, splits, rows, 1), F32)]
    inputs = (block_tables, seq_lens, query_lens, cache.block_to_slot)
    o, l, m = pl.pallas_call(
        kernel,
        grid=(b, hk, splits),
        in_specs=[whole(x) for x in inputs]
        + [pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0))]
        + [whole(cache.pages), whole(cache.pool_k), whole(cache.pool_v)],
        out_specs=[part(rows, d), part(rows, 1), part(rows, 1)],
        out_shape=out_shapes,
        compiler_params=pltr.CompilerParams(num_warps=NUM_WARPS, num_stages=2),
        interpret=interpret,
    )(*inputs, qr, cache.pages, cache.pool_k, cache.pool_v)

    # Log-sum-exp merge of the splits (a split with no tokens has l = 0).
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)
    out = jnp.sum(o * w, axis=2) / jnp.sum(l * w, axis=2)  # [B, Hk, rows, D]
    out = out[:, :, : sq * group].reshape(b, hk, sq, group, d).transpose(0, 2, 1, 3, 4)
    return reference.rotate(out.reshape(b, sq, hq, d)).astype(q.dtype)
