"""Triton kernel: attention over a paged KVarN cache (decode and multi-query rows).

The torch mirror of `kvarn_jax.pallas_attention`; the exact reference it is tested
against is `kvarn_torch.attention_reference.attention`.

Grid (batch, kv_head, row_block x split). A program owns ROWS query rows of one KV head's
GQA group (row = query token * group + head in group; all of them for decode, padded to
a power of two >= 16 for tensor-core dots) and walks its share of the sequence's tiles of
BLOCK_N tokens (BLOCK_N divides the block size G):

* a tile of a block still in the tail pool is read as stored (rotated, model dtype), in
  a loop of its own after the quantized tiles (a few per sequence: the sink and the
  blocks still being written);
* a tile of a quantized block is read from its record and dequantized in registers, with
  the per-channel K scale folded into q and the per-token V scale into p, so the codes
  go straight into the tensor-core dots. The dots are transposed: the codes are the tall
  operand (BLOCK_N or D >= 64 rows: a Hopper warpgroup MMA with the codes in registers)
  and the ROWS query rows the narrow one, so scores, probabilities and the accumulator
  are held as [tokens or channels, ROWS]:

      s^T  = tau_K * (codes_K^T @ (q * a_K)^T + (q @ z_K)^T)
      pv^T = sigma_V * (codes_V^T @ (p * a_V)^T + (p @ z_V)^T)

  A code c enters the dot as the float 1 + c / 2**bits, built by or-ing the bits into
  the mantissa of 1.0 (no int -> float conversion); the constant 1 comes back out of the
  per-row bias term, and the 2**bits folds into the scale.

  The code operand of each dot is float16 whatever the model dtype: the other operand
  is scaled per row into [-1, 1] first, so neither overflows nor loses bf16-level bits.

Codes are read as int32 words (16-byte vector loads), the fp16 scales through an fp16
view of the same pages. The loop over quantized tiles is software-pipelined by hand:
while tile t is computed, the record loads of tile t + 1 and the block-table lookups of
tile t + 2 are in flight.

Online softmax in base 2 (log2(e) folded into the query scale). Without a split the
program normalizes, rotates the output back and stores it; with splits, each writes its
partial (acc, max, sum) and a second small kernel, one program per query row, merges
them by log-sum-exp and rotates back. The query is rotated in the kernel's prologue, so
a call is one launch, or two with split-KV, and never syncs with the host (CUDA-graph
friendly).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from kvarn.format import layout
from kvarn_torch.cache import KVarNCache
from kvarn_torch.triton_common import check_pool_layout, hadamard, interpreted, runtime_int

MIN_ROWS = 16  # tensor-core dots need M >= 16
MAX_ROWS = 32  # query rows per program, in row blocks past that
# From CHUNK_MIN_ROWS query rows on (256 tokens at GQA 4), programs of CHUNK_ROWS rows at 4
# warps: 1.5x faster than 32 rows x 8 warps on 256- to 2048-token chunks over 8K-32K
# tokens on an H100 (benchmarks/results/chunk_attention_h100.json). Shorter chunks keep
# 32-row programs (a 48 x 8K vLLM burst, whose continuations are mostly short, took 30.0 s
# instead of 25.3 s on an H100 with 64 rows everywhere).
CHUNK_MIN_ROWS = 1024
CHUNK_ROWS = 64
# Launch defaults, from timing the knobs on an H100 (benchmarks/decode_attention.py --sweep,
# benchmarks/results/decode_sweep_h100.json): a whole 128-token record per iteration and
# 4 warps beat 64-token tiles and 8 warps at 16 x 32K and at 1 x 4K.
BLOCK_N_MAX = 128  # tokens per tile (64 at head_dim 256)
NUM_WARPS_SMALL = 4  # ROWS = 16 and head_dim <= 128
NUM_WARPS_LARGE = 8  # ROWS = 32 or head_dim 256, within max_warps
NUM_STAGES = 1  # loads are software-pipelined by hand in the kernel, not by Triton
# One warp per merged row: 3.8 us at 64 x 1152 tokens, 32/8 heads, on an H200, where 4
# warps took 9.4 us (their rotation back crossed warps through shared memory).
MERGE_WARPS = 1
MERGE_SPLIT_CHUNK = 32  # partials per load of the merge kernel
WARPGROUP = 4  # warps of one Hopper warpgroup MMA
DEFAULT_SMS = 132  # an H100 SXM; the real count is read from the device when on CUDA
PROGRAMS_PER_SM = 4  # split the context until about this many programs per SM
MIN_TILES_PER_SPLIT = 2  # never split a sequence finer than this many tiles...
# ...unless a tile per split still leaves at most this many programs per SM. On an H200
# (results/decode_attention_h200_split_tiles.json, decode_splits_h200_1x4k.txt): 1 x 4K,
# 32 tiles x 8 KV heads, 13.9 us at 32 splits (256 programs), 14.4 at 16; but 2 x 4K takes
# 22.4 us at 32 splits (512 programs), 18.8 at 16.
ONE_TILE_SPLITS_PER_SM = 2
# At most this many splits, unless one wave of programs (two per SM: 255 registers a
# thread) holds a larger power of two of them: few KV heads. On an H200 at batch 1
# (results/splits_b1_h200.txt), 3 KV heads: 1 x 128K 112.5 us at 32 splits, 73.9 at 64;
# 1 x 32K 35.0 and 27.1. 8 KV heads: 140.4 at 32 (a wave), 146-193 at 48-256.
MAX_SPLITS = 32
WAVE_PROGRAMS_PER_SM = 2
# Chunk-invariant launches split every sequence at the same positions whatever the batch
# (a row's sums then do not depend on it): this many tokens per split.
INVARIANT_SPLIT_TOKENS = 2048
POOL_SCAN = tl.constexpr(64)  # tiles whose pool slots one vector load looks up
LOG2E = 1.4426950408889634
MASKED = tl.constexpr(-0.7 * float(np.finfo(np.float32).max))  # exp2 turns it into 0, no NaN


# ---------------------------------------------------------------- building blocks


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (Triton's interpreter only, which multiplies bf16 bit patterns)
    widens the operands to float32, which holds fp16/bf16 values and their products
    exactly, and sums the products alike for every output: NumPy's matmul rounds an
    output by where it lies in the tile (its BLAS kernels' edges), a GPU MMA does not,
    and the chunk-invariance tests compare rows that lie in different places."""
    if UPCAST:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _slab(words, J: tl.constexpr, BITS: tl.constexpr):
    """Code J of every int32 word (bits J*BITS.. of the little-endian word) as the float16
    bit pattern of 1 + code / 2**BITS: the code moved to the top of 1.0's mantissa."""
    SHIFT: tl.constexpr = J * BITS
    TOP: tl.constexpr = 10 - BITS  # fp16 has 10 mantissa bits
    FIELD: tl.constexpr = ((1 << BITS) - 1) << TOP
    if SHIFT >= TOP:
        x = (words >> (SHIFT - TOP)) & FIELD
    else:
        x = (words << (TOP - SHIFT)) & FIELD
    return (x | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)  # 1.0 + code / 2**BITS


@triton.jit
def _pair(words, J: tl.constexpr, BITS: tl.constexpr, UPCAST: tl.constexpr):
    """Codes J and J + 16 / BITS of every int32 word, joined along a new last axis, as
    float16 1 + code / 2**BITS. On the GPU one shift and one and-or make both (one in each
    16-bit half of the word); the halves split into fp16 registers for free."""
    HALF: tl.constexpr = 16 // BITS  # codes per 16-bit half
    if UPCAST:  # the interpreter runs no PTX
        return tl.join(_slab(words, J, BITS), _slab(words, J + HALF, BITS))
    SHIFT: tl.constexpr = J * BITS
    TOP: tl.constexpr = 10 - BITS  # fp16 has 10 mantissa bits
    FIELD: tl.constexpr = (((1 << BITS) - 1) << TOP) * 0x10001  # in both halves
    if SHIFT >= TOP:
        x = words >> (SHIFT - TOP)
    else:
        x = words << (TOP - SHIFT)
    # (x & FIELD) | 1.0 in both halves: one LOP3 (0xEA: a & b | c), where the compiler
    # would emit an and and an or.
    lo, hi = tl.inline_asm_elementwise(
        f"{{ .reg .b32 t; lop3.b32 t, $2, {FIELD}, 0x3C003C00, 0xEA; mov.b32 {{$0, $1}}, t; }}",
        "=h,=h,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    return tl.join(lo, hi)


@triton.jit
def _unpack(words, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
            UPCAST: tl.constexpr):
    """[ROWS, COLS * BITS / 32] int32 words of codes packed LSB-first along the last axis
    -> [ROWS, COLS] float16, code c as the exact value 1 + c / 2**BITS (no int -> float
    conversion). The codes of each word join in bit-reversed order of their index, so
    that the joined axes flatten to word * (32 / BITS) + index."""
    if BITS == 4:
        c = tl.join(tl.join(_pair(words, 0, 4, UPCAST), _pair(words, 2, 4, UPCAST)),
                    tl.join(_pair(words, 1, 4, UPCAST), _pair(words, 3, 4, UPCAST)))
    else:  # BITS == 2
        even = tl.join(tl.join(_pair(words, 0, 2, UPCAST), _pair(words, 4, 2, UPCAST)),
                       tl.join(_pair(words, 2, 2, UPCAST), _pair(words, 6, 2, UPCAST)))
        odd = tl.join(tl.join(_pair(words, 1, 2, UPCAST), _pair(words, 5, 2, UPCAST)),
                      tl.join(_pair(words, 3, 2, UPCAST), _pair(words, 7, 2, UPCAST)))
        c = tl.join(even, odd)
    return tl.reshape(c, [ROWS, COLS], can_reorder=False)


@triton.jit
def _code_dot(y, scale, zero, codes, BITS: tl.constexpr, UPCAST: tl.constexpr):
    """sum_j (scale[j] * c[n, j] + zero[j]) * y[j, r] for y [J, R] float32 with |y| <= 1,
    fp16 scale / zero [J] and codes [N, J] = 1 + c / 2**BITS -> [N, R].

    The codes are the tall operand (M = N >= 64: a warpgroup MMA on Hopper), the query
    rows the narrow one. y * scale enters the fp16 tensor-core dot as is: |y| <= 1 bounds
    it by the fp16 scale, so it cannot overflow. The constant 1 of the codes comes back
    out of the same per-row reduction as the zero point's term, with the same operand."""
    xs = (y * scale.to(tl.float32)[:, None]).to(tl.float16)
    dot = _dot(codes, xs, tl.zeros([codes.shape[0], y.shape[1]], tl.float32), UPCAST)
    bias = tl.sum(y * zero.to(tl.float32)[:, None] - xs.to(tl.float32) * (1 << BITS), 0)
    return dot * (1 << BITS) + bias[None, :]


@triton.jit
def _store_rows(out_ptr, acc, l, b, h, rows, n_rows,
                out_stride_b, out_stride_s, out_stride_h,
                GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                LOG_D: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """Normalize acc by the softmax sum l (0 where a row saw no token), rotate back to the
    model's frame and store the valid rows into out [B, Sq, Hq, D]."""
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out = hadamard(out, ROWS, D, LOG_D) * INV_SQRT_D
    token = rows // GROUP
    head = h * GROUP + rows % GROUP
    d = tl.arange(0, D)
    ptrs = (out_ptr + b.to(tl.int64) * out_stride_b + token[:, None] * out_stride_s
            + head[:, None] * out_stride_h + d[None, :])
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None])


# ---------------------------------------------------------------- one tile


@triton.jit
def _locate(bt_row, block_to_slot_ptr, t, tile_hi, TILES_PER_BLOCK: tl.constexpr):
    """Physical block and pool slot (-1: quantized) of tile t; reads nothing past tile_hi."""
    live = t < tile_hi
    blk = tl.load(bt_row + t // TILES_PER_BLOCK, mask=live, other=0).to(tl.int64)
    slot = tl.load(block_to_slot_ptr + blk, mask=live, other=0)
    return blk, slot


@triton.jit
def _reads_record(slot, t, sink_blocks, records_hi, TILES_PER_BLOCK: tl.constexpr,
                  CHUNK_INVARIANT: tl.constexpr):
    """Whether the record loop attends to tile t: its block is quantized (no pool slot),
    or, CHUNK_INVARIANT, it is a block in [sink_blocks, records_hi) that some row of the
    program reads from its record although it is still in the pool."""
    if CHUNK_INVARIANT:
        j = t // TILES_PER_BLOCK
        return (slot < 0) | ((j >= sink_blocks) & (j < records_hi))
    else:
        return slot < 0


@triton.jit
def _load_record(words_ptr, halves_ptr, rec, n0, live, D: tl.constexpr, G: tl.constexpr,
                 BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                 K_CODES: tl.constexpr, A_K: tl.constexpr, Z_K: tl.constexpr,
                 TAU_K: tl.constexpr, V_CODES: tl.constexpr, SIGMA_V: tl.constexpr,
                 A_V: tl.constexpr, Z_V: tl.constexpr):
    """Issue every load of one tile (tokens n0 .. n0 + BLOCK_N) of the record at byte `rec`:
    K code words [D, BLOCK_N * K_BITS / 32] (a channel's codes run along tokens), V code
    words [BLOCK_N, D * V_BITS / 32] (a token's codes run along channels) and the fp16
    scales. Nothing is read where `live` is false."""
    K_ROW_WORDS: tl.constexpr = G * K_BITS // 32
    K_TILE_WORDS: tl.constexpr = BLOCK_N * K_BITS // 32
    V_ROW_WORDS: tl.constexpr = D * V_BITS // 32
    d = tl.arange(0, D)
    n = n0 + tl.arange(0, BLOCK_N)
    w = rec // 4
    k_cols = n0 * K_BITS // 32 + tl.arange(0, K_TILE_WORDS)
    k_words = tl.load(words_ptr + w + K_CODES // 4 + d[:, None] * K_ROW_WORDS + k_cols[None, :],
                      mask=live, other=0)
    # At least two threads per token's row of V words (the coalescing pass would give a
    # thread the whole row at D = 64, 16 bytes): the unpacked codes then keep lanes along
    # both dimensions, and Triton stages them for the PV dot in a shared layout their
    # registers store into whole (a layout with every lane along the tokens took 64
    # 16-bit stores a thread per tile).
    V_RUN: tl.constexpr = V_ROW_WORDS // 2
    v_cols = tl.arange(0, V_ROW_WORDS) % V_RUN + tl.arange(0, V_ROW_WORDS) // V_RUN * V_RUN
    v_words = tl.load(words_ptr + w + V_CODES // 4 + n[:, None] * V_ROW_WORDS + v_cols[None, :],
                      mask=live, other=0)
    half = rec // 2
    a_k = tl.load(halves_ptr + half + A_K // 2 + d, mask=live, other=0.0)
    z_k = tl.load(halves_ptr + half + Z_K // 2 + d, mask=live, other=0.0)
    tau = tl.load(halves_ptr + half + TAU_K // 2 + n, mask=live, other=0.0)
    sigma = tl.load(halves_ptr + half + SIGMA_V // 2 + d, mask=live, other=0.0)
    a_v = tl.load(halves_ptr + half + A_V // 2 + n, mask=live, other=0.0)
    z_v = tl.load(halves_ptr + half + Z_V // 2 + n, mask=live, other=0.0)
    return k_words, v_words, a_k, z_k, tau, sigma, a_v, z_v


@triton.jit
def _softmax_step(s, pos, limit, m_i, l_i):
    """Online softmax (base 2) of one tile of scores s [BLOCK_N, ROWS] at sequence
    positions pos: row r sees positions < limit[r]. -> (p, alpha, new max, new sum)."""
    visible = pos[:, None] < limit[None, :]
    s = tl.where(visible, s, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.where(visible, tl.exp2(s - m_new[None, :]), 0.0)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 0)


@triton.jit
def _pool_tile(i, rank, pending, tt, slots, h, q32, acc, m_i, l_i, pool_k_ptr, pool_v_ptr,
               limit, kv_end, own_block, sink_blocks, pool_stride_slot, pool_stride_tok,
               pool_stride_head, D: tl.constexpr, TILES_PER_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr, CHUNK_INVARIANT: tl.constexpr, UPCAST: tl.constexpr):
    """Attend to pool tile i (in order) of a scan chunk (tiles tt, their pool slots; the
    pool tiles `pending`, numbered by `rank`): BLOCK_N tokens of a pool block, read as
    stored (rotated, model dtype).

    Its dots keep the query rows as the tall operand (q32 [ROWS, D]); scores and output
    are transposed to the record tiles' orientation. (Transposed like those, with both
    operands in shared memory, Triton 3.6's warpgroup MMA gave wrong results at 16 rows
    on an H200.) CHUNK_INVARIANT: rows past the block read it from its record instead
    (the record loop), unless it is one of the first sink_blocks."""
    here = (pending != 0) & (rank == i)
    t = tl.sum(tl.where(here, tt, 0), 0)
    slot = tl.sum(tl.where(here, slots, 0), 0)
    if CHUNK_INVARIANT:
        j = t // TILES_PER_BLOCK
        limit = tl.where((j >= sink_blocks) & (own_block > j), 0, limit)
    offs_n = (t % TILES_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)  # in the block
    base = slot.to(tl.int64) * pool_stride_slot + h * pool_stride_head
    pos = t * BLOCK_N + tl.arange(0, BLOCK_N)  # in the sequence
    d = tl.arange(0, D)
    ptrs = base + offs_n[:, None] * pool_stride_tok + d[None, :]
    live = (pos < kv_end)[:, None]  # the rest of the block may hold stale data
    k = tl.load(pool_k_ptr + ptrs, mask=live, other=0.0)
    v = tl.load(pool_v_ptr + ptrs, mask=live, other=0.0)
    s = _dot(q32.to(k.dtype), tl.trans(k), tl.zeros([q32.shape[0], offs_n.shape[0]], tl.float32),
             UPCAST)
    p, alpha, m_i, l_i = _softmax_step(tl.trans(s), pos, limit, m_i, l_i)
    pv = _dot(tl.trans(p).to(v.dtype), v, tl.zeros([q32.shape[0], D], tl.float32), UPCAST)
    return acc * alpha[None, :] + tl.trans(pv), m_i, l_i


@triton.jit
def _record_tile(q_unit, q_norm, acc, m_i, l_i, k_words, v_words, a_k, z_k, tau, sigma, a_v,
                 z_v, pos, limit, D: tl.constexpr, BLOCK_N: tl.constexpr, K_BITS: tl.constexpr,
                 V_BITS: tl.constexpr, UPCAST: tl.constexpr):
    """Attend to BLOCK_N tokens of a quantized record (loaded by _load_record), transposed:
    q_unit [D, ROWS], acc [D, ROWS], scores [BLOCK_N, ROWS]."""
    codes_k = tl.trans(_unpack(k_words, K_BITS, D, BLOCK_N, UPCAST))  # [BLOCK_N, D]
    s = _code_dot(q_unit, a_k, z_k, codes_k, K_BITS, UPCAST)
    s = s * q_norm[None, :] * tau.to(tl.float32)[:, None]
    p, alpha, m_i, l_i = _softmax_step(s, pos, limit, m_i, l_i)
    codes_v = tl.trans(_unpack(v_words, V_BITS, BLOCK_N, D, UPCAST))  # [D, BLOCK_N]
    pv = _code_dot(p, a_v, z_v, codes_v, V_BITS, UPCAST) * sigma.to(tl.float32)[:, None]
    return acc * alpha[None, :] + pv, m_i, l_i


# ---------------------------------------------------------------- the kernels

# Serving launches with batch-dependent sizes (query length, block-table width, splits)
# and per-request slices of the step's tables (pointers 4-byte aligned only): Triton would
# compile a new variant for each divisibility and alignment class it meets, seconds each
# in the middle of a step. One variant per set of constexprs instead.
_RUNTIME_INTS = ["num_query_tokens", "has_query_lens", "splits", "tiles_per_split",
                 "max_tiles", "bt_stride_b", "part_splits", "part_first", "sink_blocks",
                 "split_tiles"]
_SLICED_POINTERS = ["block_tables_ptr", "seq_lens_ptr", "query_lens_ptr"]


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_SLICED_POINTERS)
def _attention_kernel(
    q_ptr, out_ptr, part_o_ptr, part_ml_ptr,
    words_ptr, halves_ptr, pool_k_ptr, pool_v_ptr,
    block_tables_ptr, seq_lens_ptr, query_lens_ptr, block_to_slot_ptr,
    num_query_tokens, has_query_lens, qk_scale, splits, tiles_per_split, max_tiles,
    part_splits, part_first, sink_blocks, split_tiles,
    q_stride_b, q_stride_s, q_stride_h,
    out_stride_b, out_stride_s, out_stride_h,
    page_stride_block, page_stride_head,
    pool_stride_slot, pool_stride_tok, pool_stride_head,
    bt_stride_b,
    GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr,
    G: tl.constexpr, BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    K_CODES: tl.constexpr, A_K: tl.constexpr, Z_K: tl.constexpr, TAU_K: tl.constexpr,
    V_CODES: tl.constexpr, SIGMA_V: tl.constexpr, A_V: tl.constexpr, Z_V: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    INV_SQRT_D: tl.constexpr, POOL_ONLY: tl.constexpr, CHUNK_INVARIANT: tl.constexpr,
):
    """has_query_lens 0: every sequence has num_query_tokens query rows (query_lens_ptr is
    not read; a decode call then launches nothing else to fill it). SPLIT: store split-KV
    partials as split part_first + split of part_splits per row block (the other splits
    may come from another kernel: see gluon_attention). POOL_ONLY: attend to the pool
    tiles only (the quantized ones are another kernel's). CHUNK_INVARIANT: a row reads
    every block before its own from the block's record, the first sink_blocks of the
    sequence excepted, even a block still in the pool (filled in this step: its record
    was written ahead, `cache.snapshot`), and split i covers tiles split_tiles * i ..
    split_tiles * (i + 1) - 1 of every sequence, so that a row's result depends neither on
    how the sequence's tokens were split into steps nor on the other rows of the launch.
    (split_tiles is tiles_per_split again, as a plain int: under the interpreter the loop
    bound is a NumPy int, which tensor arithmetic refuses.)"""
    TILES_PER_BLOCK: tl.constexpr = G // BLOCK_N
    b = tl.program_id(0)
    h = tl.program_id(1)
    row_block = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    n_rows = num_query_tokens * GROUP

    # The query rows of this program, rotated and scaled (softmax scale * log2 e), float32.
    rows = row_block * ROWS + tl.arange(0, ROWS)
    token = rows // GROUP
    head = h * GROUP + rows % GROUP
    row_ok = rows < n_rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * q_stride_b + token[:, None] * q_stride_s
                + head[:, None] * q_stride_h + d[None, :], mask=row_ok[:, None], other=0.0)
    q32 = hadamard(q.to(tl.float32), ROWS, D, LOG_D) * qk_scale
    # q32 = q_norm * q_unit with |q_unit| <= 1: q_unit times an fp16 scale of a record
    # can never overflow fp16, so it enters the code dots without a per-tile rescale.
    q_norm = tl.maximum(tl.max(tl.abs(q32), 1), 1e-30)
    q_unit = tl.trans(q32 / q_norm[:, None])  # [D, ROWS], as the record dots take it

    # Row i of the sequence's query sits at position seq_len - query_len + i.
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    query_len = tl.load(query_lens_ptr + b, mask=has_query_lens != 0,
                        other=num_query_tokens).to(tl.int32)
    if CAUSAL:
        limit = tl.minimum(seq_len - query_len + token + 1, seq_len)
    else:
        limit = tl.zeros([ROWS], tl.int32) + seq_len
    limit = tl.where(row_ok, limit, 0)
    kv_end = tl.max(limit, 0)  # this row block sees no position past this one
    own_block = (seq_len - query_len + token) // G  # of each row's own position
    records_hi = tl.max(tl.where(row_ok, own_block, 0), 0)  # CHUNK_INVARIANT only
    n_tiles = tl.minimum(tl.cdiv(kv_end, BLOCK_N), max_tiles)
    if CHUNK_INVARIANT:  # the same splits of a sequence whatever else the launch holds
        per_split = split_tiles
    else:
        per_split = tl.cdiv(n_tiles, splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)

    m_i = tl.zeros([ROWS], tl.float32) + MASKED
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([D, ROWS], tl.float32)  # transposed, as the record dots make it
    bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride_b

    if not POOL_ONLY:
        # Software pipeline by hand: while tile t is computed, the record loads of tile t + 1
        # are in flight and the block-table lookups of tile t + 2.
        blk0, slot0 = _locate(bt_row, block_to_slot_ptr, tile_lo, tile_hi, TILES_PER_BLOCK)
        blk1, slot1 = _locate(bt_row, block_to_slot_ptr, tile_lo + 1, tile_hi, TILES_PER_BLOCK)
        k_words, v_words, a_k, z_k, tau, sigma, a_v, z_v = _load_record(
            words_ptr, halves_ptr, blk0 * page_stride_block + h * page_stride_head,
            (tile_lo % TILES_PER_BLOCK) * BLOCK_N,
            (tile_lo < tile_hi) & _reads_record(slot0, tile_lo, sink_blocks, records_hi,
                                                TILES_PER_BLOCK, CHUNK_INVARIANT),
            D, G, BLOCK_N, K_BITS, V_BITS, K_CODES, A_K, Z_K, TAU_K, V_CODES, SIGMA_V, A_V, Z_V)
        for i in range(0, tiles_per_split):
            t = tile_lo + i
            if t < tile_hi:
                blk2, slot2 = _locate(bt_row, block_to_slot_ptr, t + 2, tile_hi, TILES_PER_BLOCK)
                k_next, v_next, a_k_next, z_k_next, tau_next, sigma_next, a_v_next, z_v_next = \
                    _load_record(words_ptr, halves_ptr,
                                 blk1 * page_stride_block + h * page_stride_head,
                                 ((t + 1) % TILES_PER_BLOCK) * BLOCK_N,
                                 (t + 1 < tile_hi) & _reads_record(
                                     slot1, t + 1, sink_blocks, records_hi, TILES_PER_BLOCK,
                                     CHUNK_INVARIANT),
                                 D, G, BLOCK_N, K_BITS, V_BITS,
                                 K_CODES, A_K, Z_K, TAU_K, V_CODES, SIGMA_V, A_V, Z_V)

                # pool tiles come after this loop
                if _reads_record(slot0, t, sink_blocks, records_hi, TILES_PER_BLOCK,
                                 CHUNK_INVARIANT):
                    pos = t * BLOCK_N + tl.arange(0, BLOCK_N)  # in the sequence
                    seen = limit
                    if CHUNK_INVARIANT:  # a pool block's record is for the rows past it
                        seen = tl.where((slot0 < 0) | (own_block > t // TILES_PER_BLOCK),
                                        limit, 0)
                    acc, m_i, l_i = _record_tile(q_unit, q_norm, acc, m_i, l_i, k_words, v_words,
                                                 a_k, z_k, tau, sigma, a_v, z_v, pos, seen, D,
                                                 BLOCK_N, K_BITS, V_BITS, UPCAST)

                slot0, blk1, slot1 = slot1, blk2, slot2
                k_words, v_words, a_k, z_k = k_next, v_next, a_k_next, z_k_next
                tau, sigma, a_v, z_v = tau_next, sigma_next, a_v_next, z_v_next

    # The pool tiles (sink and tail blocks: a few per sequence) in a loop of their own, the
    # slots of POOL_SCAN tiles looked up at once: in the record loop, the pool path's
    # registers came on top of the prefetched record (255 registers and spills). The pool
    # tiles of a chunk are then visited by rank in a counted loop: a while loop that picked
    # the next tile by reductions spilled (255 registers) and could not prefetch, so each
    # tile waited for its loads (Nsight Compute: 42% of the stalls of the Gluon path's pool
    # launch at 64 x 1152 tokens; results/decode_pool_launch_h200.txt).
    for c in range(0, tiles_per_split, POOL_SCAN):
        if tile_lo + c < tile_hi:
            tt = tile_lo + c + tl.arange(0, POOL_SCAN)
            _, slots = _locate(bt_row, block_to_slot_ptr, tt, tile_hi, TILES_PER_BLOCK)
            pending = ((tt < tile_hi) & (slots >= 0)).to(tl.int32)
            rank = tl.cumsum(pending, 0) - pending  # order among this chunk's pool tiles
            n_pool = tl.sum(pending, 0)
            if UPCAST:  # the interpreter: range() over a reduction would warn (NumPy)
                i = 0
                while i < n_pool:
                    acc, m_i, l_i = _pool_tile(i, rank, pending, tt, slots, h, q32, acc, m_i,
                                               l_i, pool_k_ptr, pool_v_ptr, limit, kv_end,
                                               own_block, sink_blocks, pool_stride_slot,
                                               pool_stride_tok, pool_stride_head, D,
                                               TILES_PER_BLOCK, BLOCK_N, CHUNK_INVARIANT,
                                               UPCAST)
                    i += 1
            else:  # a for loop, whose loads Triton pipelines (num_stages > 1)
                for i in range(0, n_pool):
                    acc, m_i, l_i = _pool_tile(i, rank, pending, tt, slots, h, q32, acc, m_i,
                                               l_i, pool_k_ptr, pool_v_ptr, limit, kv_end,
                                               own_block, sink_blocks, pool_stride_slot,
                                               pool_stride_tok, pool_stride_head, D,
                                               TILES_PER_BLOCK, BLOCK_N, CHUNK_INVARIANT,
                                               UPCAST)

    acc = tl.trans(acc)  # [ROWS, D]
    if SPLIT:  # partials [B, Hk, row_blocks, part_splits, ...] for the merge kernel
        part = (((b.to(tl.int64) * tl.num_programs(1) + h) * (tl.num_programs(2) // splits)
                 + row_block) * part_splits + part_first + split)
        r = tl.arange(0, ROWS)
        tl.store(part_o_ptr + part * ROWS * D + r[:, None] * D + d[None, :], acc)
        tl.store(part_ml_ptr + part * 2 * ROWS + r, m_i)
        tl.store(part_ml_ptr + part * 2 * ROWS + ROWS + r, l_i)
    else:
        _store_rows(out_ptr, acc, l_i, b, h, rows, n_rows, out_stride_b, out_stride_s,
                    out_stride_h, GROUP, ROWS, D, LOG_D, INV_SQRT_D)


@triton.jit(do_not_specialize=["num_query_tokens", "splits", "chunks"])
def _merge_kernel(
    part_o_ptr, part_ml_ptr, out_ptr, num_query_tokens, splits, chunks,
    out_stride_b, out_stride_s, out_stride_h,
    GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr,
    INV_SQRT_D: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Merge the splits of one query row by log-sum-exp, normalize, rotate back and store.
    Every split program of the attention kernel stores its partial (one that saw no token:
    zeros, sum 0, max MASKED), so the three loads need not wait for each other.

    One program per real query row (a decode call's padding rows, 12 of 16 at GQA 4, get
    none), SPLIT_CHUNK splits per load: the partials' loads are all in flight at once,
    where a loop over splits waited for each."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.program_id(2)  # < num_query_tokens * GROUP
    row_block = row // ROWS
    r = row % ROWS
    rows = row + tl.arange(0, 1)
    row_blocks = tl.cdiv(num_query_tokens * GROUP, ROWS)
    first = ((b.to(tl.int64) * tl.num_programs(1) + h) * row_blocks + row_block) * splits
    d = tl.arange(0, D)
    m = tl.zeros([1], tl.float32) + MASKED
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, D], tl.float32)
    for c in range(0, chunks):  # == cdiv(splits, SPLIT_CHUNK)
        s = c * SPLIT_CHUNK + tl.arange(0, SPLIT_CHUNK)
        part = first + s
        m_s = tl.load(part_ml_ptr + part * 2 * ROWS + r, mask=s < splits, other=MASKED)
        l_s = tl.load(part_ml_ptr + part * 2 * ROWS + ROWS + r, mask=s < splits, other=0.0)
        o_s = tl.load(part_o_ptr + (part * ROWS + r)[:, None] * D + d[None, :],
                      mask=(s < splits)[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        acc = acc * alpha[:, None] + tl.sum(o_s * beta[:, None], 0)[None, :]
        l = l * alpha + tl.sum(l_s * beta, 0)
        m = m_new
    _store_rows(out_ptr, acc, l, b, h, rows, num_query_tokens * GROUP, out_stride_b,
                out_stride_s, out_stride_h, GROUP, 1, D, LOG_D, INV_SQRT_D)


# ---------------------------------------------------------------- host side


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def num_splits(programs: int, max_tiles: int, num_sms: int = DEFAULT_SMS) -> int:
    """Split the context only when the (batch, KV head, row block) programs leave the GPU's
    SMs short of work: then aim at PROGRAMS_PER_SM programs per SM, with at least
    MIN_TILES_PER_SPLIT tiles in each split and at most MAX_SPLITS (or the power of two
    of them that one wave holds, if more), or one tile per split where that keeps within
    ONE_TILE_SPLITS_PER_SM programs per SM (short contexts, latency-bound)."""
    if programs >= num_sms:
        return 1
    wave = WAVE_PROGRAMS_PER_SM * num_sms // programs
    cap = max(MAX_SPLITS, 1 << (wave.bit_length() - 1))  # a power of two
    if programs * max_tiles <= ONE_TILE_SPLITS_PER_SM * num_sms:
        return max(1, min(max_tiles, cap))
    want = PROGRAMS_PER_SM * num_sms // programs  # rounded down: no partial last wave
    return max(1, min(want, max_tiles // MIN_TILES_PER_SPLIT, cap))


def launch_config(head_dim: int, tile: int, n_rows: int,
                  rows: int | None = None) -> tuple[int, int, int]:
    """(rows, block_n, num_warps) for `n_rows` query rows (tokens x GQA group): `rows` per
    program as given or the default, the others the defaults for it."""
    rows = rows or (CHUNK_ROWS if n_rows >= CHUNK_MIN_ROWS
                    else min(MAX_ROWS, max(MIN_ROWS, triton.next_power_of_2(n_rows))))
    block_n = min(tile, BLOCK_N_MAX if head_dim <= 128 else BLOCK_N_MAX // 2)
    warps = NUM_WARPS_LARGE if head_dim > 128 or rows == MAX_ROWS else NUM_WARPS_SMALL
    return rows, block_n, min(warps, max_warps(head_dim, block_n))


def max_warps(head_dim: int, block_n: int) -> int:
    """The tall operands of the record dots have min(block_n, head_dim) rows: Hopper's
    warpgroup MMA (4 warps) takes 64 of them at a time, and with fewer per warpgroup
    Triton 3.6 split the query rows between warpgroups and faulted on an H200."""
    return WARPGROUP * max(1, min(head_dim, block_n) // 64)


def _check_int_tensor(name: str, x: Tensor, shape: tuple[int, ...], device) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {list(x.shape)}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64; got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the cache on {device}")


def attention(q: Tensor, cache: KVarNCache, block_tables: Tensor, seq_lens: Tensor,
              query_lens: Tensor | None = None, causal: bool = True,
              softmax_scale: float | None = None, splits: int | None = None, *,
              rows: int | None = None, block_n: int | None = None,
              num_warps: int | None = None, num_stages: int = NUM_STAGES,
              max_registers: int | None = None,
              pool_partials: tuple[Tensor, Tensor, int] | None = None,
              chunk_invariant: bool = False,
              out: Tensor | None = None) -> Tensor | None:
    """q [B, Sq, Hq, D] (Sq = 1: decode; Sq > 1: the last query_lens[b] tokens of each
    sequence, already appended) -> out [B, Sq, Hq, D] in q's dtype (rows past
    query_lens[b] hold don't-care values).

    block_tables [B, M] int32/int64 physical block ids; seq_lens [B] (tokens in the cache,
    the query rows included); query_lens [B] (default Sq). `splits` defaults to an
    automatic split-KV choice (`num_splits`); `rows` (query rows per program, a power of
    two >= 16), `block_n` (tokens per tile, a power of two >= 16 dividing the block size),
    `num_warps`, `num_stages` and `max_registers` (a per-thread register cap: more
    programs per SM, spills past it) are tuning knobs with defaults from `launch_config`.

    pool_partials (part_o, part_ml, first): attend to the pool tiles only and write their
    split-KV partials as splits `first` .. `first + splits - 1` of these buffers ([B, Hk,
    row blocks, all splits, rows, D] and [..., 2, rows]; another kernel writes the
    quantized tiles' splits: `gluon_attention`); returns None, and `out` is not used.

    chunk_invariant: each row reads the blocks before its own from their records (the
    sequence's first `cache.sink_blocks` excepted) and its own block as stored, whichever
    step filled them: blocks filled by this call's rows need their records written first
    (`cache.snapshot`). A row's result then does not depend on how its sequence was split
    into steps (prefill chunks, speculative windows, prefix-cache hits); and, `splits`
    left to the default, split-KV cuts every sequence each INVARIANT_SPLIT_TOKENS tokens,
    so it does not depend on the batch either.

    out: where to write the result (q's shape and dtype; e.g. a view of the caller's
    output buffer, saving a copy), a new tensor by default.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Sq, Hq, D]; got shape {list(q.shape)}")
    b, sq, hq, d = q.shape
    hk, g = cache.num_kv_heads, cache.tile
    if d != cache.head_dim or hq % hk or sq < 1:
        raise ValueError(f"q must be [B, Sq >= 1, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"the cache's {hk} KV heads; got {list(q.shape)}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q is {q.dtype} but the cache holds {cache.dtype}; cast q first")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.device}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, M]; got {list(block_tables.shape)}")
    _check_int_tensor("block_tables", block_tables, tuple(block_tables.shape), q.device)
    _check_int_tensor("seq_lens", seq_lens, (b,), q.device)
    has_query_lens = query_lens is not None
    if has_query_lens:
        _check_int_tensor("query_lens", query_lens, (b,), q.device)
    if not q.is_cuda and not interpreted(_attention_kernel):
        raise ValueError("the Triton attention kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
                         "set before kvarn_torch is imported to run it on the CPU")
    group = hq // hk
    n_rows = sq * group
    rows, default_block_n, default_warps = launch_config(d, g, n_rows, rows)
    if rows < MIN_ROWS or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two >= {MIN_ROWS}; got {rows}")
    block_n = block_n or default_block_n
    num_warps = num_warps or default_warps
    if block_n < 16 or block_n & (block_n - 1) or g % block_n:
        raise ValueError(f"block_n must be a power of two >= 16 dividing the block size {g}; "
                         f"got {block_n}")
    if num_warps > max_warps(d, block_n):
        raise ValueError(f"num_warps must be <= {max_warps(d, block_n)} at head_dim {d} and "
                         f"block_n {block_n} (64 tile rows per warpgroup); got {num_warps}")
    if cache.pages.stride(2) != 1:
        raise ValueError("cache.pages must be contiguous along its last axis")
    check_pool_layout(cache.pool_k, cache.pool_v)
    if q.stride(3) != 1:
        q = q.contiguous()

    lay = layout(cache.preset, d)
    p = lay.preset
    row_blocks = triton.cdiv(n_rows, rows)
    max_tiles = block_tables.shape[1] * (g // block_n)
    if chunk_invariant and splits is None:  # splits at fixed positions
        tiles_per_split = INVARIANT_SPLIT_TOKENS // block_n
        splits = triton.cdiv(max_tiles, tiles_per_split)
    else:
        if splits is None:
            splits = num_splits(b * hk * row_blocks, max_tiles, _num_sms(q.device))
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits must be a positive int; got {splits!r}")
        tiles_per_split = triton.cdiv(max_tiles, splits)
    split = splits > 1

    # A pool-only launch stores partials only: q stands in for the output it never writes.
    out = q if pool_partials is not None else output(q, out)
    part_splits, part_first = splits, 0
    if pool_partials is not None:
        if chunk_invariant:
            raise ValueError("chunk_invariant reads records of pool blocks: not with "
                             "pool_partials (a pool-only launch)")
        part_o, part_ml, part_first = pool_partials
        part_splits, split = part_o.shape[3], True
        if (part_first + splits > part_splits
                or part_o.shape != (b, hk, row_blocks, part_splits, rows, d)
                or part_ml.shape != (b, hk, row_blocks, part_splits, 2, rows)):
            raise ValueError(f"pool_partials must be [B, Hk, {row_blocks}, splits, {rows}, {d}] "
                             f"and [B, Hk, {row_blocks}, splits, 2, {rows}] buffers with room "
                             f"for the pool's {splits} splits from split {part_first} on; got "
                             f"{list(part_o.shape)}, {list(part_ml.shape)}")
    elif split:
        part_o = torch.empty((b, hk, row_blocks, splits, rows, d), dtype=torch.float32,
                             device=q.device)
        part_ml = torch.empty((b, hk, row_blocks, splits, 2, rows), dtype=torch.float32,
                              device=q.device)
    else:
        part_o = part_ml = out  # unused
    upcast = interpreted(_attention_kernel)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    pool_strides = cache.pool_k.stride()
    common = _shape_constants(group, rows, d)
    _attention_kernel[(b, hk, row_blocks * splits)](
        q, out, part_o, part_ml,
        cache.pages.view(torch.int32), cache.pages.view(torch.float16), cache.pool_k,
        cache.pool_v,
        block_tables, seq_lens, query_lens if has_query_lens else seq_lens,
        cache.block_to_slot, sq, int(has_query_lens),
        float(scale * LOG2E / math.sqrt(d)), splits,
        runtime_int(_attention_kernel, tiles_per_split), max_tiles, part_splits, part_first,
        cache.sink_blocks, tiles_per_split,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cache.pages.stride(0), cache.pages.stride(1),
        pool_strides[0], pool_strides[1], pool_strides[2],
        block_tables.stride(0),
        G=g, BLOCK_N=block_n, K_BITS=p.k_bits, V_BITS=p.v_bits,
        K_CODES=lay.k_codes.offset, A_K=lay.a_k.offset, Z_K=lay.z_k.offset,
        TAU_K=lay.tau_k.offset, V_CODES=lay.v_codes.offset, SIGMA_V=lay.sigma_v.offset,
        A_V=lay.a_v.offset, Z_V=lay.z_v.offset,
        CAUSAL=bool(causal), SPLIT=split, UPCAST=upcast,
        POOL_ONLY=pool_partials is not None, CHUNK_INVARIANT=bool(chunk_invariant),
        num_warps=num_warps, num_stages=num_stages, **common,
        **({} if max_registers is None else {"maxnreg": max_registers}),
    )
    if pool_partials is not None:
        return None
    if split:
        merge(part_o, part_ml, out, sq, group)
    return out


def output(q: Tensor, out: Tensor | None) -> Tensor:
    """`out` checked to take q's result, or a new tensor like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be like q ({list(q.shape)}, {q.dtype}, {q.device}); got "
                         f"{list(out.shape)}, {out.dtype}, {out.device}")
    if out.stride(3) != 1:
        raise ValueError("out must be contiguous along its last axis (head_dim)")
    return out


def _shape_constants(group: int, rows: int, d: int) -> dict:
    """The constexprs the attention and merge kernels share."""
    return dict(GROUP=group, ROWS=rows, D=d, LOG_D=d.bit_length() - 1,
                INV_SQRT_D=float(np.float32(1.0 / math.sqrt(d))))


def merge(part_o: Tensor, part_ml: Tensor, out: Tensor, num_query_tokens: int,
          group: int, *, split_chunk: int = MERGE_SPLIT_CHUNK,
          num_warps: int = MERGE_WARPS) -> None:
    """Split-KV partials part_o [B, Hk, row blocks, splits, rows, D] and part_ml (base-2
    max and sum per row) -> out [B, Sq, Hq, D]: merged, normalized and rotated back, one
    program per query row. `split_chunk` (splits per load) and `num_warps` are tuning
    knobs."""
    b, hk, row_blocks, splits, rows, d = part_o.shape
    _merge_kernel[(b, hk, num_query_tokens * group)](
        part_o, part_ml, out, num_query_tokens, splits,
        runtime_int(_merge_kernel, triton.cdiv(splits, split_chunk)),
        out.stride(0), out.stride(1), out.stride(2),
        SPLIT_CHUNK=split_chunk, num_warps=num_warps, **_shape_constants(group, rows, d),
    )
