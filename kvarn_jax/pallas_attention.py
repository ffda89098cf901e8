"""Pallas kernel: attention over a paged KVarN cache (decode and multi-query rows).

The JAX twin of `kvarn_torch.triton_attention`, built the same way; the exact reference
it is tested against is `kvarn_jax.attention_reference.attention`.

Grid (batch, kv_head, split). A program owns every query row of one KV head's GQA group
(all Sq x Hq/Hk rows, padded to a power of two >= 16 for tensor-core dots) and walks its
share of the sequence's blocks, one block (tile) per iteration:

* a quantized block is read from its record and dequantized in registers, with the
  per-channel K scale folded into q and the per-token V scale into p, so the codes go
  straight into the tensor-core dots. The dots are transposed: the codes are the tall
  operand (G or D >= 64 rows: on Hopper a warpgroup MMA that takes them from registers)
  and the query rows the narrow one, so scores, probabilities and the accumulator are
  held as [tokens or channels, rows]:

      s^T  = tau_K * (codes_K^T @ (q * a_K)^T + (q @ z_K)^T)
      pv^T = sigma_V * (codes_V^T @ (p * a_V)^T + (p @ z_V)^T)

  A code c enters the dot as the float16 1 + c / 2**bits, or-ed into the mantissa of 1.0
  (no int -> float conversion; on the GPU one LOP3 makes two); the constant 1 comes back
  out of the per-row bias term, and the 2**bits folds into the scale. The other operand
  is the query (or p) scaled into [-1, 1] first, so the fp16 dot neither overflows nor
  loses bf16-level bits;
* a block still in the tail pool (the sink and the blocks being written: a few per
  sequence) is read as stored (rotated, model dtype) in a loop of its own after the
  quantized blocks, their slots looked up POOL_SCAN blocks per vector load.

The record loop is software-pipelined by hand: while block j is computed, the record
loads of block j + 1 and the table lookups of block j + 2 are in flight. Online softmax
in base 2 per split; the query is rotated in the kernel's prologue. A second small
kernel, one program per query row, merges the splits by log-sum-exp, normalizes and
rotates the output back: a decode call is these two launches and nothing else.
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
from kvarn_jax import tile_math
from kvarn_jax.cache import KVarNCache

MIN_ROWS = 16  # tensor-core dots need M >= 16
MERGE_WARPS = 4
WARPGROUP = 4  # warps of one Hopper warpgroup MMA: 64 rows of the codes operand each
NUM_STAGES = 1  # the record loads are pipelined by hand in the kernel
# Split-KV: from timing split counts on an H200 (32/8 heads, D = 128): at batch 1 the most
# splits up to 32, down to one block each (4K: 35.7 us at 32 vs 39.1 at 16 and 41.5 at
# 8), at 16 x 4K two (106 us vs 119 at 4 and 123 at 8): about two programs per SM (255
# registers a thread), as many as fit one wave.
DEFAULT_SMS = 132  # an H100 SXM; the real count is read from the device on a GPU
PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 1
MAX_SPLITS = 32  # ...unless one wave holds more, a power of two up to MAX_WAVE_SPLITS:
# batch 1 with 3 KV heads on an H200, 1 x 128K: 110.2 us at 32 splits, 80.1 at 64, 85.1
# at 128; 1 x 32K: 33.0, 26.4, 31.3 (results/splits_b1_h200.txt). (The merge holds a
# program's partials at once: 64 x D floats.)
MAX_WAVE_SPLITS = 64
# Chunk-invariant calls split every sequence at the same positions whatever the batch (a
# row's sums then do not depend on it): this many tokens per split.
INVARIANT_SPLIT_TOKENS = 2048
POOL_SCAN = 64  # blocks whose pool slots one vector load looks up
NO_BLOCK = 2**31 - 1
MASK = -0.7 * float(np.finfo(np.float32).max)  # exp2 turns it into 0, no NaN
LOG2E = 1.4426950408889634
F32 = jnp.float32
F16 = jnp.float16


def num_warps(head_dim: int, tile: int) -> int:
    """One warpgroup (a 128 x 128 tile runs best at 4 warps in the Triton twin), two for
    128-token tiles of head_dim 256, whose codes would not fit one warpgroup's registers."""
    return 2 * WARPGROUP if head_dim > 128 and tile > 64 else WARPGROUP


# ---------------------------------------------------------------- record fields


def _words(ref, blk, h, offset: int, rows: int, cols: int):
    """[rows, cols] little-endian uint32 words of a record field (the pages are bytes:
    XLA would copy the whole cache to hand the kernel a uint32 view)."""
    x = ref[blk, h, pl.ds(offset, 4 * rows * cols)].astype(jnp.uint32)
    b02, b13 = jnp.unstack(x.reshape(rows, cols, 2, 2), axis=-1)
    b0, b2 = jnp.unstack(b02, axis=-1)
    b1, b3 = jnp.unstack(b13, axis=-1)
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


def _halves(ref, blk, h, offset: int, n: int):
    """n little-endian fp16 values of a record field, as float32."""
    lo, hi = jnp.unstack(ref[blk, h, pl.ds(offset, 2 * n)].astype(jnp.uint16).reshape(n, 2),
                         axis=-1)
    return lax.bitcast_convert_type(lo | (hi << 8), F16).astype(F32)


def _load_record(pages_ref, blk, h, lay: Layout):
    """Every field of the record of (block, KV head) that attention reads: K code words
    [D, G * k_bits / 32] (a channel's codes run along tokens), V code words
    [G, D * v_bits / 32] (a token's codes run along channels), the fp16 scales."""
    g, d, p, f = lay.preset.tile, lay.head_dim, lay.preset, lay.fields
    return (_words(pages_ref, blk, h, f["k_codes"].offset, d, g * p.k_bits // 32),
            _words(pages_ref, blk, h, f["v_codes"].offset, g, d * p.v_bits // 32),
            *(_halves(pages_ref, blk, h, f[name].offset, n)
              for name, n in (("a_k", d), ("z_k", d), ("tau_k", g), ("sigma_v", d),
                              ("a_v", g), ("z_v", g))))


# ---------------------------------------------------------------- codes and dots


def _pair(words, j: int, bits: int, gpu: bool):
    """Codes j and j + 16 / bits of every word, stacked on a new last axis, as float16
    1 + code / 2**bits: one shift and one and-or make both (one in each 16-bit half)."""
    top = 10 - bits  # fp16 has 10 mantissa bits
    shift = j * bits
    x = words >> (shift - top) if shift >= top else words << (top - shift)
    field = (((1 << bits) - 1) << top) * 0x10001  # in both halves
    if gpu:  # (x & field) | 1.0 in both halves: one LOP3 where the compiler emits two ops
        y, = pltr.elementwise_inline_asm(  # (Triton's integers are signless: int32)
            f"lop3.b32 $0, $1, {field}, 0x3C003C00, 0xEA;",
            args=[lax.bitcast_convert_type(x, jnp.int32)], constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])
        y = lax.bitcast_convert_type(y, jnp.uint32)
    else:  # the interpreter runs no PTX
        y = (x & np.uint32(field)) | np.uint32(0x3C003C00)
    lo, hi = (lax.bitcast_convert_type(half.astype(jnp.uint16), F16)
              for half in (y & np.uint32(0xFFFF), y >> np.uint32(16)))
    return jnp.stack([lo, hi], axis=-1)


def _unpack(words, bits: int, rows: int, cols: int, gpu: bool):
    """[rows, cols * bits / 32] words of codes packed LSB-first along the last axis ->
    [rows, cols] float16 1 + c / 2**bits. The codes of a word are stacked in bit-reversed
    order of their index, so that the stacked axes flatten to word * (32 / bits) + index."""
    p = functools.partial(_pair, words, bits=bits, gpu=gpu)
    st = lambda a, b: jnp.stack([a, b], axis=-1)  # noqa: E731
    if bits == 4:
        c = st(st(p(0), p(2)), st(p(1), p(3)))
    else:  # bits == 2
        c = st(st(st(p(0), p(4)), st(p(2), p(6))), st(st(p(1), p(5)), st(p(3), p(7))))
    return c.reshape(rows, cols)


def _code_dot(y, scale, zero, codes, bits: int):
    """sum_j (scale[j] * c[j, n] + zero[j]) * y[j, r] for y [J, R] float32 with |y| <= 1,
    scale / zero [J] and codes [J, N] = 1 + c / 2**bits -> [N, R]. y * scale enters the
    fp16 dot as is (|y| <= 1 bounds it by the fp16 scale); the codes' constant 1 comes
    back out of the zero point's row sum, against the same rounded operand."""
    ys = (y * scale[:, None]).astype(F16)
    dot = pltr.dot(codes, ys, trans_a=True)
    bias = jnp.sum(y * zero[:, None] - ys.astype(F32) * (1 << bits), axis=0, keepdims=True)
    return dot * (1 << bits) + bias


def _softmax_step(s, pos, limit, m, l):
    """Online softmax (base 2) of scores s [G, R] at sequence positions pos [G, 1]: row r
    sees positions < limit[0, r]. -> (p, alpha, new max, new sum), all [1, R] but p."""
    visible = pos < limit
    s = jnp.where(visible, s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(visible, jnp.exp2(s - m_new), 0.0)
    return p, alpha, m_new, l * alpha + jnp.sum(p, axis=0, keepdims=True)


# ---------------------------------------------------------------- the kernel


def _attention_kernel(bt_ref, lens_ref, qlens_ref, b2s_ref, q_ref, pages_ref, pk_ref, pv_ref,
                      o_ref, l_ref, m_ref, *query_refs, lay: Layout, group: int,
                      blocks_per_split: int, causal: bool, q_scale: float, gpu: bool,
                      query_len: int | None, rows: int, sinks: int | None, pool_only: bool):
    """sinks None: a block is read from its record where it has no pool slot. An int
    (chunk-invariant reads): each row reads the blocks before its own from their records,
    the first `sinks` excepted, even those still in the pool (records written ahead).
    pool_only: the pool blocks alone (another kernel reads the records), and query_refs
    (q_unit [R, D] fp16, q_norm [1, R]) get the query rows that kernel reads."""
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, d, p = lay.preset.tile, lay.head_dim, lay.preset
    max_blocks = bt_ref.shape[1]
    # The query rows [R, D] (zero past the real ones), rotated and scaled (softmax scale *
    # log2 e / sqrt(D)).
    real = lax.broadcasted_iota(jnp.int32, (rows, d), 0) < q_ref.shape[2]
    q = pltr.load(q_ref.at[b, h, pl.ds(0, rows), :], mask=real, other=0.0)
    q = tile_math.fwht_last(q.astype(F32)) * np.float32(q_scale)
    # q = q_norm * q_unit with |q_unit| <= 1 (see _code_dot), transposed for the dots.
    q_norm = jnp.maximum(jnp.max(jnp.abs(q), axis=1, keepdims=True), 1e-30).T  # [1, R]
    q_unit = q.T / q_norm  # [D, R]
    if query_refs:
        query_refs[0][...] = (q / q_norm.T).astype(query_refs[0].dtype)
        query_refs[1][...] = q_norm

    seq_len = lens_ref[b]
    row = lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    q_len = qlens_ref[b] if query_len is None else query_len
    if causal:
        limit = jnp.minimum(seq_len - q_len + row // group + 1, seq_len)
    else:
        limit = jnp.full((1, rows), seq_len, jnp.int32)
    own = (seq_len - q_len + row // group) // g  # each row's own block
    last_own = jnp.max(jnp.where(row < q_ref.shape[2], own, 0))

    def reads_record(j, slot):  # whether the record loop attends to block j
        if sinks is None:
            return slot < 0
        return (slot < 0) | ((j >= sinks) & (j < last_own))
    n_blocks = (seq_len + g - 1) // g
    start = split * blocks_per_split
    stop = jnp.minimum(start + blocks_per_split, n_blocks)

    def locate(j):  # physical block and pool slot (-1: quantized), in bounds past the end
        blk = jnp.maximum(bt_ref[b, jnp.clip(j, 0, max_blocks - 1)], 0)
        return blk, b2s_ref[blk]

    def record_block(j, carry):
        acc, m, l, blk_next, slot, slot_next, rec = carry
        blk_after, slot_after = locate(j + 2)
        rec_next = _load_record(pages_ref, blk_next, h, lay)

        def attend(acc, m, l):
            k_words, v_words, a_k, z_k, tau, sigma, a_v, z_v = rec
            pos = j * g + lax.broadcasted_iota(jnp.int32, (g, 1), 0)
            codes_k = _unpack(k_words, p.k_bits, d, g, gpu)  # [D, G]
            s = _code_dot(q_unit, a_k, z_k, codes_k, p.k_bits) * q_norm * tau[:, None]
            prob, alpha, m, l = _softmax_step(s, pos, seen, m, l)
            codes_v = _unpack(v_words, p.v_bits, g, d, gpu)  # [G, D]
            pv = _code_dot(prob, a_v, z_v, codes_v, p.v_bits) * sigma[:, None]
            return acc * alpha + pv, m, l

        seen = limit if sinks is None else jnp.where((slot < 0) | (own > j), limit, 0)
        acc, m, l = lax.cond(reads_record(j, slot), attend, lambda *c: c, acc, m, l)
        return acc, m, l, blk_after, slot_next, slot_after, rec_next

    def pool_block(j, slot, acc, m, l):  # keeps the query rows tall, transposes its results
        pos = j * g + lax.broadcasted_iota(jnp.int32, (g, 1), 0)
        live = pos < seq_len  # the rest of the block may hold stale data
        k = jnp.where(live, pk_ref[slot, :, h, :], 0)  # [G, D]
        v = jnp.where(live, pv_ref[slot, :, h, :], 0)
        s = pltr.dot(q.astype(k.dtype), k, trans_b=True).T  # [G, R]
        seen = limit if sinks is None else jnp.where((j >= sinks) & (own > j), 0, limit)
        prob, alpha, m, l = _softmax_step(s, pos, seen, m, l)
        pv = pltr.dot(prob.T.astype(v.dtype), v).T  # [D, R]
        return acc * alpha + pv, m, l

    def pool_scan(c, carry):
        js = start + c * POOL_SCAN + lax.broadcasted_iota(jnp.int32, (POOL_SCAN,), 0)
        blks = jnp.maximum(bt_ref[b, jnp.minimum(js, max_blocks - 1)], 0)
        slots = b2s_ref[blks]
        pending = (js < stop) & (slots >= 0)

        def next_pool_block(state):
            pending, acc, m, l = state
            j = jnp.min(jnp.where(pending, js, NO_BLOCK))
            slot = jnp.max(jnp.where(js == j, slots, -1))
            return (pending & (js != j),) + pool_block(j, slot, acc, m, l)

        state = lax.while_loop(lambda s: jnp.max(s[0].astype(jnp.int32)) > 0, next_pool_block,
                               (pending,) + carry)
        return state[1:]

    acc, m, l = jnp.zeros((d, rows), F32), jnp.full((1, rows), MASK, F32), jnp.zeros((1, rows), F32)
    if not pool_only:  # (no record prefetch either)
        blk0, slot0 = locate(start)
        blk1, slot1 = locate(start + 1)
        init = (acc, m, l, blk1, slot0, slot1, _load_record(pages_ref, blk0, h, lay))
        acc, m, l, *_ = lax.fori_loop(start, stop, record_block, init)
    acc, m, l = lax.fori_loop(0, (stop - start + POOL_SCAN - 1) // POOL_SCAN, pool_scan,
                              (acc, m, l))
    o_ref[...] = acc.T
    l_ref[...] = l.T
    m_ref[...] = m.T


def _merge_kernel(*refs, splits: tuple[int, ...]):
    """One query row: merge the partials of its splits (refs: o, l, m of each set, then
    out) by log-sum-exp (a split that saw no token has sum 0 and max MASK; rows past a
    set's `splits` are padding), normalize (0 where no split saw a token), rotate back to
    the model's frame and store."""
    sets, out_ref = [refs[3 * i:3 * i + 3] for i in range(len(splits))], refs[-1]
    ms, ls, os_ = [], [], []
    for (o_ref, l_ref, m_ref), n in zip(sets, splits):
        valid = lax.broadcasted_iota(jnp.int32, l_ref.shape, 0) < n  # [S, 1]
        ms.append(jnp.where(valid, m_ref[...], MASK))
        ls.append(jnp.where(valid, l_ref[...], 0.0))
        os_.append(jnp.where(valid, o_ref[...], 0.0))
    top = functools.reduce(jnp.maximum, [jnp.max(m, axis=0, keepdims=True) for m in ms])
    acc = total = 0.0
    for o, l, m in zip(os_, ls, ms):
        w = jnp.exp2(m - top)
        acc = acc + jnp.sum(o * w, axis=0, keepdims=True)  # [1, D]
        total = total + jnp.sum(l * w, axis=0, keepdims=True)
    out = acc / jnp.where(total > 0, total, 1.0)
    d = out.shape[-1]
    out = tile_math.fwht_last(out) * np.float32(1 / math.sqrt(d))
    out_ref[...] = out.reshape(d).astype(out_ref.dtype)


def num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int = DEFAULT_SMS) -> int:
    """Split the context only when batch x heads leaves the GPU's SMs short of programs:
    then aim at PROGRAMS_PER_SM programs per SM (a wave), at most MAX_SPLITS splits or
    the largest power of two up to MAX_WAVE_SPLITS that the wave holds."""
    programs = batch * kv_heads
    if programs >= num_sms:
        return 1
    want = PROGRAMS_PER_SM * num_sms // programs  # rounded down: no partial last wave
    cap = max(MAX_SPLITS, min(1 << (want.bit_length() - 1), MAX_WAVE_SPLITS))
    return max(1, min(want, max_blocks // MIN_BLOCKS_PER_SPLIT, cap))


@functools.cache
def _num_sms() -> int:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return DEFAULT_SMS
    return getattr(device, "core_count", 0) or DEFAULT_SMS


def attention(q: jax.Array, cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
              query_lens: jax.Array | None = None, *, causal: bool = True,
              softmax_scale: float | None = None, splits: int | None = None,
              chunk_invariant: bool = False, interpret: bool | None = None) -> jax.Array:
    """q [B, Sq, Hq, D] (Sq = 1: decode; Sq > 1: the last query_lens[b] tokens of each
    sequence, already appended) -> out [B, Sq, Hq, D] in q's dtype.

    block_tables [B, M] int32 physical block ids; seq_lens [B] int32 (tokens in the cache,
    the query rows included); query_lens [B] (default Sq). `splits` defaults to an
    automatic split-KV choice. chunk_invariant: each row reads the blocks before its own
    from their records (the first `cache.sink_blocks` excepted) and its own block as
    stored, whichever step filled them: blocks filled by this call's rows need their
    records written first (`cache.snapshot`); a row's result then does not depend on how
    its sequence was split into steps, and, `splits` left to the default, split-KV cuts
    every sequence each INVARIANT_SPLIT_TOKENS tokens, so it does not depend on the batch
    either."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    if d != cache.head_dim or hq % hk:
        raise ValueError(f"q must be [B, Sq, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"{hk} KV heads; got {q.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B={b}, M] and seq_lens [B]; got "
                         f"{block_tables.shape}, {seq_lens.shape}")
    if query_lens is not None and query_lens.shape != (b,):
        raise ValueError(f"query_lens must be [B={b}]; got {query_lens.shape}")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_lens", query_lens)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integers (int32); got {x.dtype}")
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None (automatic); got {splits!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    width = block_tables.shape[1]
    if chunk_invariant and splits is None:  # splits at fixed positions
        bps = max(1, INVARIANT_SPLIT_TOKENS // cache.tile)
        splits = -(-width // bps)
    else:
        splits = splits or num_splits(b, hk, width, _num_sms())
        bps = -(-width // splits)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    return _attention(q, cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
                      None if query_lens is None else query_lens.astype(jnp.int32), causal,
                      float(scale), splits, bps, bool(chunk_invariant), interpret)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10))
def _attention(q, cache, block_tables, seq_lens, query_lens, causal, scale, splits, bps,
               chunk_invariant, interpret):
    o, l, m = _partials(q, cache, block_tables, seq_lens, query_lens, causal, scale, splits,
                        bps, chunk_invariant, interpret, pool_only=False)
    return _merge(((o, l, m, splits),), q, interpret)


def pool_partials(q: jax.Array, cache: KVarNCache, block_tables: jax.Array,
                  seq_lens: jax.Array, softmax_scale: float | None = None,
                  interpret: bool | None = None) -> tuple[jax.Array, ...]:
    """Decode partials of the pool blocks alone (sink, tail), for a kernel that reads the
    records itself: (o [B, Hk, 1, rows, D], l, m [B, Hk, 1, rows, 1]) float32, `merge`'s
    format (o unnormalized in the rotated frame, m base 2), and that kernel's query rows:
    q_unit [B, Hk, rows, D] fp16 and q_norm [B, Hk, 1, rows] float32, q_unit * q_norm the
    rotated query times softmax scale * log2 e, |q_unit| <= 1 (its rows past the group
    0)."""
    d = q.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    return _partials(q, cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
                     None, True, float(scale), 1, block_tables.shape[1], False, interpret,
                     pool_only=True)


def merge(o: jax.Array, l: jax.Array, m: jax.Array, q: jax.Array, splits: int,
          interpret: bool | None = None, more: tuple | None = None) -> jax.Array:
    """Partials ([B, Hk, S, rows, D] and [B, Hk, S, rows, 1], S a power of two >= splits,
    the splits past `splits` ignored) -> out in q's shape and dtype, rotated back.
    more: a second set (o, l, m, splits) of another kernel, merged with the first (its
    own S and rows)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    sets = ((o, l, m, splits),) + ((tuple(more),) if more is not None else ())
    return _merge(sets, q, interpret)


def _partials(q, cache, block_tables, seq_lens, query_lens, causal, scale, splits, bps,
              chunk_invariant, interpret, *, pool_only):
    b, sq, hq, d = q.shape
    hk, group = cache.num_kv_heads, hq // cache.num_kv_heads
    rows = max(MIN_ROWS, 1 << math.ceil(math.log2(sq * group)))
    lay = layout(cache.preset, d)
    # The query rows of each KV head (row = token * group + head in group; for decode a
    # reshape, no copy), read padded to `rows` by masked loads.
    if sq == 1:
        qr = q.reshape(b, hk, group, d)
    else:
        qr = q.reshape(b, sq, hk, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, sq * group, d)
    splits_p2 = 1 << math.ceil(math.log2(splits))  # the merge loads a power of two

    # Without query_lens every sequence has Sq query rows: a constant, not an array that an
    # XLA kernel would fill before the call.
    kernel = functools.partial(_attention_kernel, lay=lay, group=group, blocks_per_split=bps,
                               causal=causal, q_scale=scale * LOG2E / math.sqrt(d),
                               gpu=not interpret, query_len=None if query_lens is not None else sq,
                               rows=rows, sinks=cache.sink_blocks if chunk_invariant else None,
                               pool_only=pool_only)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    part = lambda *shape: pl.BlockSpec((None, None, None, *shape),  # noqa: E731
                                       lambda i, j, s: (i, j, s) + (0,) * len(shape))
    partials = [jax.ShapeDtypeStruct((b, hk, splits_p2, rows, n), F32) for n in (d, 1, 1)]
    out_specs = [part(rows, d), part(rows, 1), part(rows, 1)]
    if pool_only:  # and the query rows of the record kernel
        partials += [jax.ShapeDtypeStruct((b, hk, rows, d), jnp.float16),
                     jax.ShapeDtypeStruct((b, hk, 1, rows), F32)]
        out_specs += [pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
                      pl.BlockSpec((None, None, 1, rows), lambda i, j, s: (i, j, 0, 0))]
    inputs = (block_tables, seq_lens,
              seq_lens if query_lens is None else query_lens,  # (not read without them)
              cache.block_to_slot)
    return pl.pallas_call(
        kernel,
        grid=(b, hk, splits),
        in_specs=[whole(x) for x in (*inputs, qr, cache.pages, cache.pool_k, cache.pool_v)],
        out_specs=out_specs,
        out_shape=partials,
        compiler_params=pltr.CompilerParams(num_warps=num_warps(d, lay.preset.tile),
                                            num_stages=NUM_STAGES),
        interpret=interpret,
    )(*inputs, qr, cache.pages, cache.pool_k, cache.pool_v)


def _merge(sets, q, interpret):
    """One program per real query row merges its splits (of each set of partials) and
    stores it rotated back."""
    b, sq, hq, d = q.shape
    hk = sets[0][0].shape[1]
    group = hq // hk
    row = lambda s, n: pl.BlockSpec((None, None, s, None, n),  # noqa: E731
                                    lambda i, j, r: (i, j, 0, r, 0))
    return pl.pallas_call(
        functools.partial(_merge_kernel, splits=tuple(int(x[3]) for x in sets)),
        grid=(b, hk, sq * group),
        in_specs=[row(o.shape[2], n) for o, *_ in sets for n in (d, 1, 1)],
        out_specs=pl.BlockSpec((None, None, None, d),
                               lambda i, j, r: (i, r // group, j * group + r % group, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltr.CompilerParams(num_warps=MERGE_WARPS, num_stages=1),
        interpret=interpret,
    )(*(x for o, l, m, _ in sets for x in (o, l, m)))
