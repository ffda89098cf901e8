"""Triton kernel: rotated K/V tiles -> KVarN records (kvarn.oracle.quantize), one tile per
program, one launch per half (K, V) of the records.

Both halves of a record come from one kernel, launched once per half: it quantizes each
row of an [R, C] view of a stored tile, the K tile read as [D channels, G tokens], the V
tile as stored, [G tokens, D channels]. Steps as in the oracle: canonicalize, variance
normalization (oracle.normalize), rescale, round-to-nearest-even codes (oracle.rtn),
absorption of the row scale into the fp16 step and zero, packing, byte stores.

Sums follow the oracle's canonical pair tree in one of two exact forms (SUMS):
* "scratch", for the GPU: each level stores its values to a per-program float32 scratch
  tile in global memory (L1/L2 resident) and reloads them at stride 2. Every tensor
  keeps a plain blocked layout.
* "registers", for the interpreter: reshape + split per level (tl.trans for columns).
  Ten times fewer interpreted ops, but on the GPU the compiler's layout choices for it
  blow up (whole tiles in every thread; compiles that never finish).
Both give the same bits; tests run both under the interpreter.
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
    interpreted,
    pair_sum_last,
    runtime_int,
    store_fp16_bytes,
    to_fp16,
    widen_f32,
)

NUM_WARPS = 8  # 16 for 256-channel tiles: 64 floats per thread per tile-sized tensor.
# (ptxas for sm_90, per half: 128x128 at 8 warps -> 255 registers, 2.3 KB stack; 256x128
# at 8 warps -> 32 registers, 9 KB stack; at 16 warps -> 64 registers, 4 KB stack.)
DEFAULT_ITERS = 8
SCRATCH_BYTES = 64 << 20  # per launch; larger batches go in several launches
STD_MIN, STD_MAX = tl.constexpr(f32(1e-3)), tl.constexpr(f32(1e3))
SCALE_MIN = tl.constexpr(f32(0.7408182206817179))  # float32(exp(-0.3))
SCALE_MAX = tl.constexpr(f32(22026.465794806718))  # float32(exp(10))
IMB_FLOOR = tl.constexpr(f32(1e-8))
DELTA_MIN = tl.constexpr(f32(1e-10))


@triton.jit
def _load_tile(ptr, R: tl.constexpr, C: tl.constexpr, ROW_STRIDE: tl.constexpr,
               COL_STRIDE: tl.constexpr, KIND: tl.constexpr):
    """The canonical float32 [R, C] view of a stored tile: (i, j) at i*ROW_STRIDE + j*COL_STRIDE."""
    offs = tl.arange(0, R)[:, None] * ROW_STRIDE + tl.arange(0, C)[None, :] * COL_STRIDE
    return canonicalize(widen_f32(tl.load(ptr + offs), KIND))


@triton.jit
def _pair_sum(scr, x, R: tl.constexpr, C: tl.constexpr, LOG_N: tl.constexpr, AXIS: tl.constexpr,
              IN_REGISTERS: tl.constexpr):
    """Sum x [R, C] along AXIS (0: columns -> [1, C], 1: rows -> [R, 1]) by the canonical
    tree ((x0 + x1) + (x2 + x3)) + ..., in registers or through the scratch tile `scr`."""
    if IN_REGISTERS:
        if AXIS == 0:
            s = tl.reshape(pair_sum_last(tl.trans(x), C, R, LOG_N), [1, C], can_reorder=False)
        else:
            s = pair_sum_last(x, R, C, LOG_N)
    else:
        s = _pair_sum_scratch(scr, x, R, C, LOG_N, AXIS)
    return s


@triton.jit
def _pair_sum_scratch(scr, x, R: tl.constexpr, C: tl.constexpr, LOG_N: tl.constexpr,
                      AXIS: tl.constexpr):
    """_pair_sum level by level through the scratch tile: element k of a level is
    element 2k + element 2k + 1 of the level before, stored and reloaded at stride 2."""
    rows = tl.arange(0, R)[:, None]
    cols = tl.arange(0, C)[None, :]
    tl.debug_barrier()  # whoever used the scratch tile before is done with it
    tl.store(scr + rows * C + cols, x)
    for level in tl.static_range(LOG_N):
        if AXIS == 0:
            k = tl.arange(0, R >> (level + 1))[:, None]
            even = scr + 2 * k * C + cols
            step = C
            out = scr + k * C + cols
        else:
            k = tl.arange(0, C >> (level + 1))[None, :]
            even = scr + rows * C + 2 * k
            step = 1
            out = scr + rows * C + k
        tl.debug_barrier()  # the level's inputs are written
        # .cg: read through L2, where the other threads' stores are
        s = tl.load(even, cache_modifier=".cg") + tl.load(even + step, cache_modifier=".cg")
        if level + 1 < LOG_N:
            tl.debug_barrier()  # every input is read before it is overwritten
            tl.store(out, s)
    return s


@triton.jit
def _pack_store(ptr, q, scr, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                IN_REGISTERS: tl.constexpr):
    """Pack codes q [R, C] LSB first along the row and store the [R, C // (8 // BITS)]
    bytes at ptr: byte j of a row holds code (8 // BITS) * j + i at bit i * BITS."""
    PER_BYTE: tl.constexpr = 8 // BITS
    rows = tl.arange(0, R)[:, None]
    byte = tl.arange(0, C // PER_BYTE)[None, :]
    if IN_REGISTERS:  # merge adjacent pairs, doubling the field width each time
        for i in tl.static_range(3):
            if (BITS << i) < 8:
                a, b = tl.split(tl.reshape(q, [R, C >> (i + 1), 2], can_reorder=False))
                q = a | (b << (BITS << i))
        packed = q
    else:  # read the codes back from the scratch tile at stride PER_BYTE
        tl.debug_barrier()
        tl.store(scr + rows * C + tl.arange(0, C)[None, :], q.to(tl.float32))
        tl.debug_barrier()
        packed = tl.zeros([R, C // PER_BYTE], tl.int32)
        for i in tl.static_range(PER_BYTE):
            code = tl.load(scr + rows * C + byte * PER_BYTE + i, cache_modifier=".cg")
            packed = packed | (code.to(tl.int32) << (i * BITS))
    tl.store(ptr + rows * (C // PER_BYTE) + byte, packed.to(tl.uint8))


@triton.jit
def _std(scr, x, R: tl.constexpr, C: tl.constexpr, LOG_N: tl.constexpr, AXIS: tl.constexpr,
         INV_N: tl.constexpr, INV_NM1: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """Two-pass Bessel-corrected std of x [R, C] along AXIS, axis kept."""
    mean = _pair_sum(scr, x, R, C, LOG_N, AXIS, IN_REGISTERS) * INV_N
    d = x - mean
    return tl.sqrt_rn(_pair_sum(scr, d * d, R, C, LOG_N, AXIS, IN_REGISTERS) * INV_NM1)


@triton.jit
def _rescale(x, c, r):
    """X * rcp(c)[col] * rcp(r)[row], values below the smallest normal flushed to +0."""
    y = x * tl.div_rn(tl.full(c.shape, 1.0, tl.float32), c)
    y = y * tl.div_rn(tl.full(r.shape, 1.0, tl.float32), r)
    return tl.where(tl.abs(y) < F32_MIN_NORMAL, 0.0, y)


@triton.jit
def _scaled(tile_ptr, c, r, R: tl.constexpr, C: tl.constexpr, ROW_STRIDE: tl.constexpr,
            COL_STRIDE: tl.constexpr, KIND: tl.constexpr):
    """rescale(X, c, r) with X reloaded (from L1/L2): holding X in registers across the
    normalization loop as well costs spills on the GPU."""
    return _rescale(_load_tile(tile_ptr, R, C, ROW_STRIDE, COL_STRIDE, KIND), c, r)


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
def _quantize_kernel(
    tiles_ptr, out_ptr, scratch_ptr, iters, KIND: tl.constexpr, RECORD_BYTES: tl.constexpr,
    R: tl.constexpr, C: tl.constexpr, LOG_R: tl.constexpr, LOG_C: tl.constexpr,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    INV_R: tl.constexpr, INV_RM1: tl.constexpr, INV_C: tl.constexpr, INV_CM1: tl.constexpr,
    BITS: tl.constexpr, INV_QMAX: tl.constexpr,
    CODES: tl.constexpr, ROW_SCALE: tl.constexpr, ROW_ZERO: tl.constexpr, COL_SCALE: tl.constexpr,
    IN_REGISTERS: tl.constexpr,
):
    """Quantize each row of one tile viewed as X [R, C] (element (i, j) at
    i * ROW_STRIDE + j * COL_STRIDE) and write its fields into the tile's record: codes
    [R, C] packed at CODES, fp16 row scale / zero [R] and column scale [C]."""
    tile = tl.program_id(0).to(tl.int64)
    tile_ptr = tiles_ptr + tile * R * C
    rec_ptr = out_ptr + tile * RECORD_BYTES
    scr = scratch_ptr + tile * R * C
    QMAX: tl.constexpr = (1 << BITS) - 1

    # Variance normalization: keep the most balanced iterate, ties to the later one.
    c = tl.full([1, C], 1.0, tl.float32)
    r = tl.full([R, 1], 1.0, tl.float32)
    y = _scaled(tile_ptr, c, r, R, C, ROW_STRIDE, COL_STRIDE, KIND)
    s_col = _std(scr, y, R, C, LOG_R, 0, INV_R, INV_RM1, IN_REGISTERS)
    best = _imbalance(s_col, _std(scr, y, R, C, LOG_C, 1, INV_C, INV_CM1, IN_REGISTERS))
    best_c = c
    best_r = r
    for _ in range(iters):
        c = _clamp(c * _clamp(s_col, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = _scaled(tile_ptr, c, r, R, C, ROW_STRIDE, COL_STRIDE, KIND)
        s_row = _std(scr, y, R, C, LOG_C, 1, INV_C, INV_CM1, IN_REGISTERS)
        r = _clamp(r * _clamp(s_row, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = _scaled(tile_ptr, c, r, R, C, ROW_STRIDE, COL_STRIDE, KIND)
        s_col = _std(scr, y, R, C, LOG_R, 0, INV_R, INV_RM1, IN_REGISTERS)
        imb = _imbalance(s_col, _std(scr, y, R, C, LOG_C, 1, INV_C, INV_CM1, IN_REGISTERS))
        keep = imb <= best
        best = tl.where(keep, imb, best)
        best_c = tl.where(keep, c, best_c)
        best_r = tl.where(keep, r, best_r)

    # Asymmetric RTN per row; round-half-even from floor (no rint in Triton's core ops).
    b = _scaled(tile_ptr, best_c, best_r, R, C, ROW_STRIDE, COL_STRIDE, KIND)
    lo = tl.min(b, axis=1, keep_dims=True)
    hi = tl.max(b, axis=1, keep_dims=True)
    delta = tl.maximum((hi - lo) * INV_QMAX, DELTA_MIN)
    v = tl.div_rn(b - lo, delta)
    f = tl.floor(v)
    frac = v - f
    q = f.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))
    q = _clamp(q + up.to(tl.int32), 0, QMAX)

    _pack_store(rec_ptr + CODES, q, scr, R, C, BITS, IN_REGISTERS)
    rows = tl.arange(0, R)[:, None]
    store_fp16_bytes(rec_ptr + ROW_SCALE + 2 * rows, to_fp16(best_r * delta))
    store_fp16_bytes(rec_ptr + ROW_ZERO + 2 * rows, to_fp16(best_r * lo))
    store_fp16_bytes(rec_ptr + COL_SCALE + 2 * tl.arange(0, C)[None, :], to_fp16(best_c))


def quantize(
    k_rot: Tensor, v_rot: Tensor, preset: str, iters: int = DEFAULT_ITERS, *, sums: str = "auto"
) -> Tensor:
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8.

    sums: "auto" (registers under the interpreter, scratch on the GPU), "scratch" or
    "registers" (interpreter only); the bytes are the same.
    """
    if sums not in ("auto", "scratch", "registers"):
        raise ValueError(f"sums must be 'auto', 'scratch' or 'registers'; got {sums!r}")
    in_registers = interpreted(_quantize_kernel) if sums == "auto" else sums == "registers"
    if in_registers and not interpreted(_quantize_kernel):
        raise ValueError("sums='registers' is for the Triton interpreter only (see module doc)")
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
    per_launch = max(1, SCRATCH_BYTES // (4 * g * d))
    # (the register form never touches it, but every launch gets a valid pointer)
    scratch = torch.empty((min(n, per_launch), g * d) if not in_registers else (1,),
                          dtype=torch.float32, device=k.device)
    num_warps = NUM_WARPS if g * d <= 128 * 128 else 2 * NUM_WARPS
    # One launch per half of the record (each half compiles to half the code):
    # K rows are channels (the stored [G, D] tile read as [D, G]), V rows are tokens.
    halves = [
        (k, d, g, 1, d, p.k_bits, lay.k_codes, lay.a_k, lay.z_k, lay.tau_k),
        (v, g, d, d, 1, p.v_bits, lay.v_codes, lay.a_v, lay.z_v, lay.sigma_v),
    ]
    for tiles, r, c, row_stride, col_stride, bits, codes, row_scale, row_zero, col_scale in halves:
        for start in range(0, n, per_launch):
            stop = min(n, start + per_launch)
            _quantize_kernel[(stop - start,)](
                tiles[start:stop], out[start:stop], scratch, runtime_int(_quantize_kernel, iters),
                KIND=KIND_BF16 if bf16 else KIND_FP16, RECORD_BYTES=lay.record_bytes,
                R=r, C=c, LOG_R=r.bit_length() - 1, LOG_C=c.bit_length() - 1,
                ROW_STRIDE=row_stride, COL_STRIDE=col_stride,
                INV_R=f32(1.0 / r), INV_RM1=f32(1.0 / (r - 1)),
                INV_C=f32(1.0 / c), INV_CM1=f32(1.0 / (c - 1)),
                BITS=bits, INV_QMAX=f32(1.0 / ((1 << bits) - 1)),
                CODES=codes.offset, ROW_SCALE=row_scale.offset, ROW_ZERO=row_zero.offset,
                COL_SCALE=col_scale.offset, IN_REGISTERS=in_registers,
                num_warps=num_warps, enable_fp_fusion=False,
            )
    return out
