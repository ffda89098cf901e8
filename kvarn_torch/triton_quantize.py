"""Triton kernel: rotated K/V tiles -> KVarN records (kvarn.oracle.quantize), one tile per
program (many under Triton's interpreter), one launch per half (K, V) of the records.

Both halves of a record come from one kernel, launched once per half: it quantizes each
row of an [R, C] view of a stored tile, the K tile read as [D channels, G tokens], the V
tile as stored, [G tokens, D channels]. Steps as in the oracle: canonicalize, variance
normalization (oracle.normalize), rescale, round-to-nearest-even codes (oracle.rtn),
absorption of the row scale into the fp16 step and zero, packing, byte stores.

The bit view. The tile is held as a tensor with one axis of length 2 per bit of its row
and column indices (R * C = 2^14 elements -> 14 axes), after a leading axis of the
program's tiles (length 1 compiled; under the interpreter, whose cost is per operation,
as many tiles as fit one tensor). Every level of the oracle's pair tree
((x0 + x1) + (x2 + x3)) + ... adds the two halves of one such axis: level k of a
row sum is tl.sum over the axis of column bit k. A sum of two terms is one IEEE addition
on every backend, so these sums are exact (tl.sum over a longer axis is not: its order
differs between the GPU and the interpreter). Row and column vectors (means, stds,
scales) are the same tensor with length 1 on the other index's axes; they broadcast
against the tile without reshapes, so the whole kernel keeps the one register layout of
the tile load: no layout conversions, and a reduction over a bit held in a thread's
registers is an add, over a bit held by lanes a shuffle, by warps a shared-memory step.

Which bit lands where follows from how the tile is loaded: as a 4-D view
[C_HI, R_HI, S, 8] of its high column bits, high row bits, the low bits of the strided
index (S = elements per thread / 8) and the low 3 bits of the contiguous index (16-byte
vectors). Triton's coalesced layout puts the vectors in registers, fills lanes and then
warps from the first axis on (axes of equal contiguity go in index order) and leaves the
S strided rows or columns to registers. With NUM_WARPS = 8 per 128 x 128 tile each
thread holds an 8 x 8 block: every tree starts with 3 levels of in-thread adds, row sums
(4 per iteration) stay within a warp, column sums (2) end with 3 shared-memory steps.
The view only moves work: the trees are written in memory bit order.

Why not reshape + split per level (the Pallas kernel's form): split needs its pair in one
thread's registers, so Triton 3.6 moves whole rows into every thread, and reduction
results in slice-of-linear layouts broadcast back against the tile give layouts with
whole tiles per thread (1024 registers; compiles that never finish). The bit view needs
neither a split nor a layout conversion of the tile.

Rounded division and square root without their slow paths. tl.div_rn / tl.sqrt_rn
compile to PTX div.rn.f32 / sqrt.rn.f32, which ptxas expands to a short fast path behind
a range test and a branch to a slow-path call (~10 instructions a value, paid for each
scale and std of the 8 rows and 8 columns a thread holds and for each of its 64 RTN
quotients). Every operand here lies in the fast range, so _rcp, _sqrt and _div emit the
fast path alone, as inline PTX: the same instructions, so the same bits (each helper says
why its range is met; tests/test_triton_fast_math.py checks them against tl.div_rn /
tl.sqrt_rn on a GPU); the RTN quotients share one reciprocal per row. An fp16 tile is
held as fp16 and widened at each use (_widen). Inline PTX does not run in Triton's
interpreter: there (PTX False) the helpers are tl.div_rn, tl.sqrt_rn and a plain
conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kvarn import oracle
from kvarn.checks import check_iters, check_tiles
from kvarn.format import layout
from kvarn_torch.triton_common import (
    F32_MIN_NORMAL,
    KIND_BF16,
    KIND_FP16,
    as_kind,
    canonicalize,
    f32,
    interpreted,
    per_program,
    runtime_int,
    store_fp16_bytes,
    to_fp16,
    widen_f32,
)

NUM_WARPS = 8  # per 128 x 128 tile, scaled with the tile: an 8 x 8 block per thread
# Registers per thread: 128 lets two 8-warp programs share an SM (65,536 registers), whose
# latency hiding (the kernel waits on shuffles and shared memory) outweighs the spills:
# 0.77 -> 0.87 M tile pairs/s for k4v2_g128, D = 128 on an H200; as fast or faster at
# every head_dim and tile than no cap, or than re-reading X instead of holding it. With the
# fast paths (fp16, benchmarks/results/quantize_variants_h200.txt): uncapped 1.017 vs 1.002 M
# with the float32 tile, but 1.036 with the fp16 tile at 128 (not measured uncapped).
MAX_REGISTERS = 128
DEFAULT_ITERS = 8
LOAD_VECTOR = 8  # fp16 / bf16 elements per 16-byte load (Triton's coalesced layout)
STD_MIN, STD_MAX = tl.constexpr(f32(1e-3)), tl.constexpr(f32(1e3))
SCALE_MIN = tl.constexpr(f32(0.7408182206817179))  # float32(exp(-0.3))
SCALE_MAX = tl.constexpr(f32(22026.465794806718))  # float32(exp(10))
IMB_FLOOR = tl.constexpr(f32(1e-8))
DELTA_MIN = tl.constexpr(f32(1e-10))
VAR_FLOOR = tl.constexpr(f32(2.0**-100))  # variances are floored here before the sqrt (_sqrt)


@triton.jit
def _load_x(ptrs, TILE_BITS: tl.constexpr, KIND: tl.constexpr, HOLD16: tl.constexpr):
    """The canonical tile X at ptrs (4-D view) in the bit view: float32, or with HOLD16
    (fp16 tiles) float16, exactly: canonicalizing an fp16 value gives an fp16 value."""
    x = canonicalize(widen_f32(tl.load(ptrs), KIND))
    if HOLD16:
        x = x.to(tl.float16)
    return tl.reshape(x, TILE_BITS, can_reorder=False)


@triton.jit
def _pair_sum(x, LOG: tl.constexpr, LO: tl.constexpr, HI_AT: tl.constexpr, LO_AT: tl.constexpr):
    """Sum the bit view x over one tile index of LOG bits by the canonical tree: level k
    adds the halves of memory bit k. Its bits below LO are the axes from LO_AT, the others
    the axes from HI_AT (high bits first). Axes are kept (length 1)."""
    for k in tl.static_range(LOG):
        x = tl.sum(x, axis=LO_AT + LO - 1 - k if k < LO else HI_AT + LOG - 1 - k,
                   keep_dims=True)
    return x


@triton.jit
def _bits_max(x, LOG: tl.constexpr, LO: tl.constexpr, HI_AT: tl.constexpr,
              LO_AT: tl.constexpr, IS_MAX: tl.constexpr):
    """max (or min) of the bit view over one tile index (exact in any order)."""
    for k in tl.static_range(LOG):
        if IS_MAX:
            x = tl.max(x, axis=LO_AT + LO - 1 - k if k < LO else HI_AT + LOG - 1 - k,
                       keep_dims=True)
        else:
            x = tl.min(x, axis=LO_AT + LO - 1 - k if k < LO else HI_AT + LOG - 1 - k,
                       keep_dims=True)
    return x


@triton.jit
def _rcp(x, PTX: tl.constexpr):
    """1 / x correctly rounded, for x of biased exponent 1..252 (module doc: fast paths).

    In that range ptxas computes rcp.rn.f32 as MUFU.RCP refined by one Newton step, the
    code below; outside it, a slow path. Callers pass scales clamped to [SCALE_MIN,
    SCALE_MAX] (exponents 126..141) and RTN steps in [DELTA_MIN, 2^17) (93..143). ptxas
    forms the error term as -(x t - 1), here as 1 - x t: the same value under
    round-to-nearest, up to the sign of an exact zero, which t + t e does not see."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t, e, n; rcp.approx.ftz.f32 t, $1; neg.f32 n, $1; "
            "fma.rn.f32 e, n, t, 0f3F800000; fma.rn.f32 $0, t, e, t; }",
            "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def _sqrt(var, PTX: tl.constexpr):
    """sqrt(max(var, 2^-100)), correctly rounded: a std from a variance.

    ptxas computes sqrt.rn.f32 by the code below (MUFU.RSQ, two FMUL, two FFMA) for x in
    [2^-101, FLT_MAX], by a slow path otherwise. The floor cannot change a byte: it only
    moves stds below 2^-50, and a std is only used clamped to [STD_MIN, STD_MAX] (scale
    updates) or, after min / max, floored at IMB_FLOOR = 1e-8 (_ratio); the floor commutes
    with min and max, so every std below 1e-8 acts as 1e-8 whatever its value."""
    x = tl.maximum(var, VAR_FLOOR)
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 r, s, h, e, n; rsqrt.approx.ftz.f32 r, $1; mul.ftz.f32 s, $1, r; "
            "mul.ftz.f32 h, r, 0f3F000000; neg.f32 n, s; fma.rn.f32 e, n, s, $1; "
            "fma.rn.f32 $0, e, h, s; }",
            "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, d, rd, PTX: tl.constexpr):
    """a / d correctly rounded, given rd = _rcp(d), for d in [DELTA_MIN, 2^17) and a / d
    in [0, 15.5] (the RTN quotients (b - lo) / delta: at most QMAX, plus rounding).

    ptxas computes div.rn.f32 as rd (MUFU.RCP, 2 FFMA), q = a rd, then q + rd (a - d q)
    (FMUL, 2 FFMA: the code below), unless FCHK flags the operands for a slow path. The
    sequence is Markstein's correction, correctly rounded as long as no step over- or
    underflows, and FCHK is that range test (its exact form is undocumented). Here d is
    normal and a < 2^18: nothing overflows; the remainder a - d q, a multiple of
    ulp(d) ulp(q) >= 2^-48 a, is exact for a >= 2^-100. A smaller a (bf16 tiles only)
    gives a / d < 2^-66: code 0 whatever its last bit. rd is one reciprocal per row, where
    div.rn.f32 recomputes it for every element."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 q, e, n; mul.rn.f32 q, $1, $3; neg.f32 n, $2; "
            "fma.rn.f32 e, n, q, $1; fma.rn.f32 $0, $3, e, q; }",
            "=f,f,f,f", [a, d, rd], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.div_rn(a, d)


@triton.jit
def _widen(x, PTX: tl.constexpr):
    """The held tile X as float32 (exact), at each use when it is held as fp16.

    Holding an fp16 tile as fp16 halves its registers (two values a 32-bit register: 32
    for a thread's 64 elements), which under the 128-register cap go to the loop instead
    of spills (H200, k4v2_g128, D = 128: 1.002 -> 1.036 M tile pairs/s on top of the fast
    paths). The PTX conversion is marked impure so that LLVM can neither hoist it out of
    the loop, which would bring the float32 tile back, nor share it between rescales;
    pack=2 hands it both halves of a register."""
    if x.dtype != tl.float16:
        return x
    elif PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; "
            "cvt.f32.f16 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float32, is_pure=False, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _std(x, LOG: tl.constexpr, LO: tl.constexpr, HI_AT: tl.constexpr, LO_AT: tl.constexpr,
         INV_N: tl.constexpr, INV_NM1: tl.constexpr, PTX: tl.constexpr):
    """Two-pass Bessel-corrected std of x over one tile index (as _pair_sum), axes kept;
    variances below 2^-100 floored (_sqrt)."""
    mean = _pair_sum(x, LOG, LO, HI_AT, LO_AT) * INV_N
    d = x - mean
    return _sqrt(_pair_sum(d * d, LOG, LO, HI_AT, LO_AT) * INV_NM1, PTX)


@triton.jit
def _rescale(x, rc, rr, FLUSH: tl.constexpr, PTX: tl.constexpr):
    """X * rc[col] * rr[row] (reciprocal scales), values below the smallest normal flushed
    to +0 (FLUSH False: the caller knows there are none)."""
    y = _widen(x, PTX) * rc * rr
    if FLUSH:
        y = tl.where(tl.abs(y) < F32_MIN_NORMAL, 0.0, y)
    return y


@triton.jit
def _ratio(hi, lo):
    return tl.div_rn(tl.maximum(hi, IMB_FLOOR), tl.maximum(lo, IMB_FLOOR))


@triton.jit
def _imbalance(s_col, s_row, LOG_C: tl.constexpr, LO_C: tl.constexpr, C_HI_AT: tl.constexpr,
               C_LO_AT: tl.constexpr, LOG_R: tl.constexpr, LO_R: tl.constexpr,
               R_HI_AT: tl.constexpr, R_LO_AT: tl.constexpr):
    """max/min ratio of the column stds plus that of the row stds (floored at 1e-8), per
    tile. The column stds are reduced bit by bit: those axes are within a warp (no
    barrier); the row stds, across warps, in one step when there is one tile."""
    col = _ratio(_bits_max(s_col, LOG_C, LO_C, C_HI_AT, C_LO_AT, True),
                 _bits_max(s_col, LOG_C, LO_C, C_HI_AT, C_LO_AT, False))
    if s_row.shape[0] == 1:
        row = _ratio(tl.max(s_row), tl.min(s_row))
    else:
        row = _ratio(_bits_max(s_row, LOG_R, LO_R, R_HI_AT, R_LO_AT, True),
                     _bits_max(s_row, LOG_R, LO_R, R_HI_AT, R_LO_AT, False))
    return col + row


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _quantize_kernel(
    tiles_ptr, out_ptr, iters, KIND: tl.constexpr, RECORD_BYTES: tl.constexpr,
    LOG_R: tl.constexpr, LOG_C: tl.constexpr, LO_R: tl.constexpr, LO_C: tl.constexpr,
    ROW_STRIDE: tl.constexpr,
    COL_STRIDE: tl.constexpr, TILES: tl.constexpr, TILE_BITS: tl.constexpr,
    ROW_BITS: tl.constexpr, COL_BITS: tl.constexpr, UNIT_BITS: tl.constexpr,
    INV_R: tl.constexpr, INV_RM1: tl.constexpr, INV_C: tl.constexpr, INV_CM1: tl.constexpr,
    BITS: tl.constexpr, INV_QMAX: tl.constexpr,
    CODES: tl.constexpr, ROW_SCALE: tl.constexpr, ROW_ZERO: tl.constexpr, COL_SCALE: tl.constexpr,
    FLUSH: tl.constexpr, HOLD16: tl.constexpr, PTX: tl.constexpr,
):
    """Quantize each row of TILES tiles, each viewed as X [R, C] (element (i, j) at
    i * ROW_STRIDE + j * COL_STRIDE, one of the strides 1) and write its fields into the
    tile's record: codes [R, C] packed at CODES, fp16 row scale / zero [R] and column
    scale [C]. TILE_BITS, ROW_BITS, COL_BITS, UNIT_BITS: the bit-view shapes of the tiles,
    of a row vector (length 1 on the column bits), of a column vector and of a scalar per
    tile; their axis 0 is the tile. FLUSH: whether rescaled values can fall below the
    smallest normal (and must be flushed to +0 as the oracle does). HOLD16: hold the
    (fp16) tile as fp16. PTX: use the inline-PTX fast paths (False in the interpreter)."""
    R: tl.constexpr = 1 << LOG_R
    C: tl.constexpr = 1 << LOG_C
    ROWS_CONTIGUOUS: tl.constexpr = ROW_STRIDE == 1
    # Bit-view axes: the tile, column bits from LO_C up, row bits from LO_R up (high bits
    # first), the strided index's low bits, the contiguous index's low bits (module doc).
    C_HI_AT: tl.constexpr = 1
    R_HI_AT: tl.constexpr = C_HI_AT + LOG_C - LO_C
    STRIDED_LO_AT: tl.constexpr = R_HI_AT + LOG_R - LO_R
    R_LO_AT: tl.constexpr = STRIDED_LO_AT + LO_C if ROWS_CONTIGUOUS else STRIDED_LO_AT
    C_LO_AT: tl.constexpr = STRIDED_LO_AT if ROWS_CONTIGUOUS else STRIDED_LO_AT + LO_R
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER_BYTE: tl.constexpr = 8 // BITS
    LOG_PER_BYTE: tl.constexpr = 3 - (BITS >> 1)  # BITS is 2 or 4
    tile = tl.program_id(0).to(tl.int64) * TILES + tl.arange(0, TILES)
    tile_ptr = tiles_ptr + (tile * R * C)[:, None, None, None, None]
    rec_ptr = out_ptr + tl.reshape(tile * RECORD_BYTES, UNIT_BITS, can_reorder=False)

    # The 4-D load view [column high, row high, strided low, contiguous low] -> bit view.
    LO_S: tl.constexpr = LO_C if ROWS_CONTIGUOUS else LO_R
    LO_X: tl.constexpr = LO_R if ROWS_CONTIGUOUS else LO_C
    col_hi = tl.arange(0, C >> LO_C)[:, None, None, None] << LO_C
    row_hi = tl.arange(0, R >> LO_R)[None, :, None, None] << LO_R
    strided_lo = tl.arange(0, 1 << LO_S)[None, None, :, None]
    contig_lo = tl.arange(0, 1 << LO_X)[None, None, None, :]
    if ROWS_CONTIGUOUS:
        rows = row_hi + contig_lo
        cols = col_hi + strided_lo
    else:
        rows = row_hi + strided_lo
        cols = col_hi + contig_lo
    x_ptrs = tile_ptr + (rows * ROW_STRIDE + cols * COL_STRIDE)[None, :, :, :, :]
    x = _load_x(x_ptrs, TILE_BITS, KIND, HOLD16)
    # The memory row index as a row vector, the column index as a column vector.
    per_tile = tl.zeros([TILES, 1, 1, 1, 1], tl.int32)
    rows = tl.reshape(rows[None, :, :, :, :] + per_tile, ROW_BITS, can_reorder=False)
    cols = tl.reshape(cols[None, :, :, :, :] + per_tile, COL_BITS, can_reorder=False)

    # Variance normalization: keep the most balanced iterate, ties to the later one.
    # The first iterate is X itself (unit scales); the reciprocal of r is carried over
    # from one iteration to the next.
    c = tl.full(COL_BITS, 1.0, tl.float32)
    r = tl.full(ROW_BITS, 1.0, tl.float32)
    rr = r
    x0 = x.to(tl.float32)  # the first iterate: X widened once, outside the loop
    s_col = _std(x0, LOG_R, LO_R, R_HI_AT, R_LO_AT, INV_R, INV_RM1, PTX)
    s_row = _std(x0, LOG_C, LO_C, C_HI_AT, C_LO_AT, INV_C, INV_CM1, PTX)
    best = _imbalance(s_col, s_row, LOG_C, LO_C, C_HI_AT, C_LO_AT, LOG_R, LO_R, R_HI_AT,
                      R_LO_AT)
    best_c = c
    best_r = r
    for _ in range(iters):
        c = _clamp(c * _clamp(s_col, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        rc = _rcp(c, PTX)
        y = _rescale(x, rc, rr, FLUSH, PTX)
        s_row = _std(y, LOG_C, LO_C, C_HI_AT, C_LO_AT, INV_C, INV_CM1, PTX)
        r = _clamp(r * _clamp(s_row, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        rr = _rcp(r, PTX)
        y = _rescale(x, rc, rr, FLUSH, PTX)
        s_col = _std(y, LOG_R, LO_R, R_HI_AT, R_LO_AT, INV_R, INV_RM1, PTX)
        s_row = _std(y, LOG_C, LO_C, C_HI_AT, C_LO_AT, INV_C, INV_CM1, PTX)
        imb = _imbalance(s_col, s_row, LOG_C, LO_C, C_HI_AT, C_LO_AT, LOG_R, LO_R, R_HI_AT,
                         R_LO_AT)
        keep = imb <= best
        best = tl.where(keep, imb, best)
        best_c = tl.where(keep, c, best_c)
        best_r = tl.where(keep, r, best_r)

    # Asymmetric RTN per row; round-half-even from floor (no rint in Triton's core ops).
    b = _rescale(x, _rcp(best_c, PTX), _rcp(best_r, PTX), FLUSH, PTX)
    lo = _bits_max(b, LOG_C, LO_C, C_HI_AT, C_LO_AT, False)
    hi = _bits_max(b, LOG_C, LO_C, C_HI_AT, C_LO_AT, True)
    delta = tl.maximum((hi - lo) * INV_QMAX, DELTA_MIN)
    v = _div(b - lo, delta, _rcp(delta, PTX), PTX)
    f = tl.floor(v)
    frac = v - f
    q = f.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))
    q = _clamp(q + up.to(tl.int32), 0, QMAX)

    # Packing: code j of a row goes to byte j // PER_BYTE at bit (j % PER_BYTE) * BITS.
    # The fields are disjoint, so summing over the low column bits is their OR.
    packed = q << ((cols & (PER_BYTE - 1)) * BITS)
    byte = rows * (C // PER_BYTE) + (cols >> LOG_PER_BYTE)
    packed = _pair_sum(packed, LOG_PER_BYTE, LO_C, C_HI_AT, C_LO_AT)
    byte = _bits_max(byte, LOG_PER_BYTE, LO_C, C_HI_AT, C_LO_AT, True)
    tl.store(rec_ptr + CODES + byte, packed.to(tl.uint8))
    store_fp16_bytes(rec_ptr + ROW_SCALE + 2 * rows, to_fp16(best_r * delta))
    store_fp16_bytes(rec_ptr + ROW_ZERO + 2 * rows, to_fp16(best_r * lo))
    store_fp16_bytes(rec_ptr + COL_SCALE + 2 * cols, to_fp16(best_c))


def _view(r: int, c: int, rows_contiguous: bool, tiles: int):
    """(num_warps, LO_R, LO_C, tile / row vector / column vector / per-tile scalar
    bit-view shapes) of `tiles` [r, c] tiles: an 8 x (elements per thread / 8) block per
    thread (module doc)."""
    num_warps = max(1, NUM_WARPS * r * c // (128 * 128))
    lo_x = LOAD_VECTOR.bit_length() - 1
    lo_s = (r * c // (32 * num_warps * LOAD_VECTOR)).bit_length() - 1
    if lo_s < 2:  # the packing of 2-bit codes sums the low 2 column bits
        raise ValueError(f"{num_warps} warps leave fewer than 32 elements per thread")
    lo_r, lo_c = (lo_x, lo_s) if rows_contiguous else (lo_s, lo_x)
    log_r, log_c = r.bit_length() - 1, c.bit_length() - 1

    def shape(row: int, col: int):
        lo = ((col,) * lo_c + (row,) * lo_r) if rows_contiguous else ((row,) * lo_r + (col,) * lo_c)
        return (tiles,) + (col,) * (log_c - lo_c) + (row,) * (log_r - lo_r) + lo

    return num_warps, lo_r, lo_c, shape(2, 2), shape(2, 1), shape(1, 2), shape(1, 1)


def launch_params(preset: str, head_dim: int, bf16: bool, tiles: int = 1) -> list[dict]:
    """The constexpr arguments and num_warps of the two launches (K half, V half) of
    _quantize_kernel for one preset, head_dim and dtype, `tiles` tiles per program (also
    for compile reports)."""
    lay = layout(preset, head_dim)
    p, g, d = lay.preset, lay.preset.tile, head_dim
    # K rows are channels (the stored [G, D] tile read as [D, G]), V rows are tokens.
    halves = [
        (d, g, 1, d, p.k_bits, lay.k_codes, lay.a_k, lay.z_k, lay.tau_k),
        (g, d, d, 1, p.v_bits, lay.v_codes, lay.a_v, lay.z_v, lay.sigma_v),
    ]
    params = []
    for r, c, row_stride, col_stride, bits, codes, row_scale, row_zero, col_scale in halves:
        num_warps, lo_r, lo_c, tile_bits, row_bits, col_bits, unit_bits = _view(
            r, c, row_stride == 1, tiles)
        params.append(dict(
            KIND=KIND_BF16 if bf16 else KIND_FP16, RECORD_BYTES=lay.record_bytes,
            LOG_R=r.bit_length() - 1, LOG_C=c.bit_length() - 1, LO_R=lo_r, LO_C=lo_c,
            ROW_STRIDE=row_stride, COL_STRIDE=col_stride,
            TILES=tiles, TILE_BITS=tile_bits, ROW_BITS=row_bits, COL_BITS=col_bits,
            UNIT_BITS=unit_bits,
            INV_R=f32(1.0 / r), INV_RM1=f32(1.0 / (r - 1)),
            INV_C=f32(1.0 / c), INV_CM1=f32(1.0 / (c - 1)),
            BITS=bits, INV_QMAX=f32(1.0 / ((1 << bits) - 1)),
            CODES=codes.offset, ROW_SCALE=row_scale.offset, ROW_ZERO=row_zero.offset,
            COL_SCALE=col_scale.offset,
            FLUSH=oracle.rescale_can_underflow("bfloat16" if bf16 else "float16"),
            HOLD16=not bf16, PTX=not interpreted(_quantize_kernel),
            num_warps=num_warps, maxnreg=MAX_REGISTERS,
            enable_fp_fusion=False,
        ))
    return params


def quantize(
    k_rot: Tensor, v_rot: Tensor, preset: str, iters: int = DEFAULT_ITERS
) -> Tensor:
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    lay = check_tiles(tuple(k_rot.shape), k_rot.dtype, tuple(v_rot.shape), v_rot.dtype, preset)
    check_iters(iters)
    if k_rot.device != v_rot.device:
        raise ValueError(f"k and v are on different devices: {k_rot.device} vs {v_rot.device}")
    n, _, d = k_rot.shape
    if n == 0:
        return torch.zeros((0, lay.record_bytes), dtype=torch.uint8, device=k_rot.device)
    tiles = per_program(_quantize_kernel, n, k_rot[0].numel(), compiled=1)
    programs = triton.cdiv(n, tiles)
    pad = programs * tiles - n  # zero tiles, quantized and dropped
    k, v = (as_kind((F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t).contiguous())
            for t in (k_rot, v_rot))
    out = torch.zeros((n + pad, lay.record_bytes), dtype=torch.uint8, device=k_rot.device)
    # One launch per half of the record (each half compiles to half the code).
    params = launch_params(preset, d, k_rot.dtype == torch.bfloat16, tiles)
    for x, half in zip((k, v), params):
        _quantize_kernel[(programs,)](x, out, runtime_int(_quantize_kernel, iters), **half)
    return out[:n]
