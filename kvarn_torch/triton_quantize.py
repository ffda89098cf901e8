"""Triton kernel: rotated K/V tiles -> KVarN records (kvarn.oracle.quantize), one tile per
program.

The K tile is loaded transposed ([D channels, G tokens]) and the V tile as is
([G tokens, D channels]); both then go through the same body, `_quantize_rows`, which
quantizes each row of an [R, C] tile: variance normalization (oracle.normalize), rescale,
round-to-nearest-even codes (oracle.rtn), absorption of the row scale into the fp16
step and zero, packing, and the byte stores into the record.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvarn.checks import check_iters, check_tiles
from kvarn_torch.triton_common import (
    F32_MIN_NORMAL,
    KIND_BF16,
    KIND_FP16,
    canonicalize,
    f32,
    pair_sum_last,
    runtime_int,
    store_fp16_bytes,
    to_fp16,
    widen_f32,
)

NUM_WARPS = 8
DEFAULT_ITERS = 8
STD_MIN, STD_MAX = tl.constexpr(f32(1e-3)), tl.constexpr(f32(1e3))
SCALE_MIN = tl.constexpr(f32(0.7408182206817179))  # float32(exp(-0.3))
SCALE_MAX = tl.constexpr(f32(22026.465794806718))  # float32(exp(10))
IMB_FLOOR = tl.constexpr(f32(1e-8))
DELTA_MIN = tl.constexpr(f32(1e-10))


@triton.jit
def _load_tile(ptr, ROWS: tl.constexpr, COLS: tl.constexpr, ROW_STRIDE: tl.constexpr,
               COL_STRIDE: tl.constexpr, KIND: tl.constexpr):
    """The canonical float32 [ROWS, COLS] view of a stored tile with the given strides."""
    offs = tl.arange(0, ROWS)[:, None] * ROW_STRIDE + tl.arange(0, COLS)[None, :] * COL_STRIDE
    return canonicalize(widen_f32(tl.load(ptr + offs), KIND))


@triton.jit
def _as_row(v, N: tl.constexpr):
    """[N, 1] -> [1, N], exactly: the max of each column of diag(v) (-inf elsewhere).

    A reduction, rather than tl.reshape / tl.trans, so that the compiler lays the result
    out as a slice of an ordinary tile layout; after a reshape it tends to keep whole
    tiles in every thread, which explodes compile time and registers.
    """
    i = tl.arange(0, N)
    diag = tl.where(i[:, None] == i[None, :], v, float("-inf"))
    return tl.max(diag, axis=0, keep_dims=True)


@triton.jit
def _rescale(x, c, r):
    """X * rcp(c)[col] * rcp(r)[row], values below the smallest normal flushed to +0."""
    y = x * tl.div_rn(tl.full(c.shape, 1.0, tl.float32), c)
    y = y * tl.div_rn(tl.full(r.shape, 1.0, tl.float32), r)
    return tl.where(tl.abs(y) < F32_MIN_NORMAL, 0.0, y)


@triton.jit
def _row_std(x, R: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
             INV_C: tl.constexpr, INV_CM1: tl.constexpr):
    """Two-pass Bessel-corrected std of each row of [R, C] -> [R, 1]."""
    mean = pair_sum_last(x, R, C, LOG_C) * INV_C
    d = x - mean
    return tl.sqrt_rn(pair_sum_last(d * d, R, C, LOG_C) * INV_CM1)


@triton.jit
def _imbalance(s_col, s_row):
    """max/min ratio of the column stds plus that of the row stds (floored at 1e-8)."""
    col = tl.div_rn(tl.maximum(tl.max(s_col), IMB_FLOOR), tl.maximum(tl.min(s_col), IMB_FLOOR))
    row = tl.div_rn(tl.maximum(tl.max(s_row), IMB_FLOOR), tl.maximum(tl.min(s_row), IMB_FLOOR))
    return col + row


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _quantize_rows(
    tile_ptr, rec_ptr, iters, KIND: tl.constexpr,
    R: tl.constexpr, C: tl.constexpr, LOG_R: tl.constexpr, LOG_C: tl.constexpr,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    INV_R: tl.constexpr, INV_RM1: tl.constexpr, INV_C: tl.constexpr, INV_CM1: tl.constexpr,
    BITS: tl.constexpr, INV_QMAX: tl.constexpr,
    CODES: tl.constexpr, ROW_SCALE: tl.constexpr, ROW_ZERO: tl.constexpr, COL_SCALE: tl.constexpr,
):
    """Quantize each row of the tile X [R, C] (element (i, j) at tile_ptr + i * ROW_STRIDE +
    j * COL_STRIDE) and write its record fields: codes [R, C] packed at CODES, fp16 row
    scale / zero [R] and column scale [C].

    Column statistics are row statistics of X^T, loaded transposed from memory rather than
    transposed in registers (tl.trans between the sum trees makes the compiler keep whole
    tiles in every thread). Column scales c are therefore kept as [C, 1] columns of X^T.
    """
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER_BYTE: tl.constexpr = 8 // BITS
    x = _load_tile(tile_ptr, R, C, ROW_STRIDE, COL_STRIDE, KIND)
    xt = _load_tile(tile_ptr, C, R, COL_STRIDE, ROW_STRIDE, KIND)

    # Variance normalization: keep the most balanced iterate, ties to the later one.
    c = tl.full([C, 1], 1.0, tl.float32)
    r = tl.full([R, 1], 1.0, tl.float32)
    s_row = _row_std(_rescale(x, _as_row(c, C), r), R, C, LOG_C, INV_C, INV_CM1)
    s_col = _row_std(_rescale(xt, c, _as_row(r, R)), C, R, LOG_R, INV_R, INV_RM1)
    best = _imbalance(s_col, s_row)
    best_c = c
    best_r = r
    for _ in range(iters):
        c = _clamp(c * _clamp(s_col, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = _rescale(x, _as_row(c, C), r)
        r = _clamp(r * _clamp(_row_std(y, R, C, LOG_C, INV_C, INV_CM1), STD_MIN, STD_MAX),
                   SCALE_MIN, SCALE_MAX)
        s_row = _row_std(_rescale(x, _as_row(c, C), r), R, C, LOG_C, INV_C, INV_CM1)
        s_col = _row_std(_rescale(xt, c, _as_row(r, R)), C, R, LOG_R, INV_R, INV_RM1)
        imb = _imbalance(s_col, s_row)
        keep = imb <= best
        best = tl.where(keep, imb, best)
        best_c = tl.where(keep, c, best_c)
        best_r = tl.where(keep, r, best_r)

    # Asymmetric RTN per row; round-half-even from floor (no rint in Triton's core ops).
    b = _rescale(x, _as_row(best_c, C), best_r)
    lo = tl.min(b, axis=1, keep_dims=True)
    hi = tl.max(b, axis=1, keep_dims=True)
    delta = tl.maximum((hi - lo) * INV_QMAX, DELTA_MIN)
    v = tl.div_rn(b - lo, delta)
    f = tl.floor(v)
    frac = v - f
    q = f.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))
    q = _clamp(q + up.to(tl.int32), 0, QMAX)

    # Pack LSB first along the row: merge adjacent pairs, doubling the field width.
    for i in tl.static_range(3):  # 8 = BITS << (number of merges)
        if (BITS << i) < 8:
            a, b_hi = tl.split(tl.reshape(q, [R, C >> (i + 1), 2], can_reorder=False))
            q = a | (b_hi << (BITS << i))
    rows = tl.arange(0, R)[:, None]
    tl.store(rec_ptr + CODES + rows * (C // PER_BYTE) + tl.arange(0, C // PER_BYTE)[None, :],
             q.to(tl.uint8))

    store_fp16_bytes(rec_ptr + ROW_SCALE + 2 * rows, to_fp16(best_r * delta))
    store_fp16_bytes(rec_ptr + ROW_ZERO + 2 * rows, to_fp16(best_r * lo))
    store_fp16_bytes(rec_ptr + COL_SCALE + 2 * tl.arange(0, C)[:, None], to_fp16(best_c))


@triton.jit
def _quantize_kernel(
    k_ptr, v_ptr, out_ptr, iters,
    G: tl.constexpr, D: tl.constexpr, LOG_G: tl.constexpr, LOG_D: tl.constexpr,
    INV_G: tl.constexpr, INV_GM1: tl.constexpr, INV_D: tl.constexpr, INV_DM1: tl.constexpr,
    KIND: tl.constexpr, RECORD_BYTES: tl.constexpr,
    K_BITS: tl.constexpr, INV_K_QMAX: tl.constexpr, V_BITS: tl.constexpr,
    INV_V_QMAX: tl.constexpr,
    K_CODES: tl.constexpr, A_K: tl.constexpr, Z_K: tl.constexpr, TAU_K: tl.constexpr,
    V_CODES: tl.constexpr, SIGMA_V: tl.constexpr, A_V: tl.constexpr, Z_V: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    rec_ptr = out_ptr + tile * RECORD_BYTES
    # K: rows are channels, i.e. the stored [G, D] tile read as [D, G].
    _quantize_rows(k_ptr + tile * G * D, rec_ptr, iters, KIND, D, G, LOG_D, LOG_G, 1, D,
                   INV_D, INV_DM1, INV_G, INV_GM1, K_BITS, INV_K_QMAX, K_CODES, A_K, Z_K, TAU_K)
    # V: rows are tokens, the tile as stored.
    _quantize_rows(v_ptr + tile * G * D, rec_ptr, iters, KIND, G, D, LOG_G, LOG_D, D, 1,
                   INV_G, INV_GM1, INV_D, INV_DM1, V_BITS, INV_V_QMAX, V_CODES, A_V, Z_V, SIGMA_V)


def quantize(k_rot: Tensor, v_rot: Tensor, preset: str, iters: int = DEFAULT_ITERS) -> Tensor:
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    lay = check_tiles(tuple(k_rot.shape), k_rot.dtype, tuple(v_rot.shape), v_rot.dtype, preset)
    check_iters(iters)
    if k_rot.device != v_rot.device:
        raise ValueError(f"k and v are on different devices: {k_rot.device} vs {v_rot.device}")
    n, g, d = k_rot.shape
    p = lay.preset
    out = torch.zeros((n, lay.record_bytes), dtype=torch.uint8, device=k_rot.device)
    if n == 0:
        return out
    bf16 = k_rot.dtype == torch.bfloat16
    # bf16 tiles travel as their int16 bits (see triton_common)
    k, v = (t.contiguous().view(torch.int16) if bf16 else t.contiguous() for t in (k_rot, v_rot))
    _quantize_kernel[(n,)](
        k, v, out, runtime_int(_quantize_kernel, iters),
        G=g, D=d, LOG_G=g.bit_length() - 1, LOG_D=d.bit_length() - 1,
        INV_G=f32(1.0 / g), INV_GM1=f32(1.0 / (g - 1)),
        INV_D=f32(1.0 / d), INV_DM1=f32(1.0 / (d - 1)),
        KIND=KIND_BF16 if bf16 else KIND_FP16, RECORD_BYTES=lay.record_bytes,
        K_BITS=p.k_bits, INV_K_QMAX=f32(1.0 / p.k_qmax),
        V_BITS=p.v_bits, INV_V_QMAX=f32(1.0 / p.v_qmax),
        K_CODES=lay.k_codes.offset, A_K=lay.a_k.offset, Z_K=lay.z_k.offset,
        TAU_K=lay.tau_k.offset, V_CODES=lay.v_codes.offset, SIGMA_V=lay.sigma_v.offset,
        A_V=lay.a_v.offset, Z_V=lay.z_v.offset,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out
