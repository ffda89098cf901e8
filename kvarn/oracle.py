"""The NumPy oracle: the KVarN tile codec written out step by step.

This file is the specification of the tile bytes. Every other implementation (jnp,
Pallas, torch, Triton) must reproduce its output byte for byte, so each step is spelled
out with the exact IEEE float32 operations, in the exact order, that the others use:

* no fused multiply-add (numpy never contracts);
* division and square root correctly rounded (numpy float32 `/` and `sqrt` are IEEE);
* every sum is the canonical pairwise tree `pair_sum` (adjacent pairs, level by level);
* no exp/log and no dot products;
* constants are float32 values rounded once from float64 (never a division by a
  constant, which compilers rewrite into a reciprocal multiply);
* no subnormal ever decides a byte: inputs below 2**-100 become +0, every rescaled tile
  flushes values below the smallest normal to +0, stored zeros are +0, and the imbalance
  floors both of its std ratios' terms at 1e-8 (XLA on CPU flushes subnormals, GPUs and
  numpy keep them; with these rules both give the same bytes).

Tiles come batched as [N, G, D] (N tiles of G tokens by D channels) in float16,
bfloat16 (`ml_dtypes.bfloat16`) or float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from kvarn.checks import check_iters, check_records, check_rotate_input, check_tiles
from kvarn.format import Layout

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
FP16_MAX = F32(65504.0)  # inputs are saturated to the range the fp16 record can hold
TINY_INPUT = F32(2.0**-100)  # smaller inputs are zero (keeps every intermediate normal)
F32_MIN_NORMAL = F32(np.finfo(np.float32).tiny)
STD_MIN, STD_MAX = F32(1e-3), F32(1e3)
SCALE_MIN, SCALE_MAX = F32(np.exp(-0.3)), F32(np.exp(10.0))
IMB_FLOOR = F32(1e-8)
DELTA_MIN = F32(1e-10)
DEFAULT_ITERS = 8
CHUNK_TILES = 16  # tiles per pass of quantize (CPU cache size, not semantics)


def canonicalize(x: np.ndarray) -> np.ndarray:
    """float32 copy of x with NaN -> 0, |x| saturated at 65504, |x| < 2^-100 (and -0) -> +0."""
    x = np.asarray(x).astype(F32)
    x = np.where(np.isnan(x), F32(0), x)
    x = np.minimum(np.maximum(x, -FP16_MAX), FP16_MAX)
    return np.where(np.abs(x) < TINY_INPUT, F32(0), x)


def to_storage(x: np.ndarray, dtype) -> np.ndarray:
    """Round float32 to `dtype` to nearest-even, saturating at its finite range; -0 -> +0."""
    dtype = np.dtype(dtype)
    if dtype != np.float32:
        hi = F32(float(ml_dtypes.finfo(dtype).max))
        x = np.minimum(np.maximum(x, -hi), hi)
    y = x.astype(dtype)
    return np.where(y == 0, np.zeros((), dtype), y)


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalized Sylvester Walsh-Hadamard transform along the last axis.

    Stage h (h = 1, 2, 4, ..., D/2) pairs element i with i + h inside each block of 2h:
    a, b -> a + b, a - b.
    """
    d = x.shape[-1]
    h = 1
    while h < d:
        y = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(x.shape)
        h *= 2
    return x


def rotate(x: np.ndarray) -> np.ndarray:
    """Multiply the last axis by the normalized Hadamard matrix; same dtype out.

    The matrix is symmetric and orthonormal, so this is also the inverse rotation.
    """
    check_rotate_input(x.shape, x.dtype)
    d = x.shape[-1]
    y = fwht(canonicalize(x)) * F32(1.0 / np.sqrt(d))
    return to_storage(y, x.dtype)


def pair_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """Sum along `axis` (-1 or -2, power-of-two length) by the canonical pairwise tree
    ((x0 + x1) + (x2 + x3)) + ..., keeping the axis with length 1."""
    if axis == -2:
        return np.swapaxes(pair_sum(np.swapaxes(x, -1, -2), -1), -1, -2)
    while x.shape[-1] > 1:
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        x = pairs[..., 0] + pairs[..., 1]
    return x


def std(x: np.ndarray, axis: int) -> np.ndarray:
    """Two-pass sample standard deviation (Bessel-corrected) along `axis`, axis kept."""
    n = x.shape[axis]
    mean = pair_sum(x, axis) * F32(1.0 / n)
    d = x - mean
    np.multiply(d, d, out=d)
    return np.sqrt(pair_sum(d, axis) * F32(1.0 / (n - 1)))


def rescale(x: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Y = X * rcp(c)[col] * rcp(r)[row] for X [N, R, C], c [N, 1, C], r [N, R, 1]."""
    y = x * (F32(1) / c)
    y *= F32(1) / r
    y[np.abs(y) < F32_MIN_NORMAL] = 0
    return y


def rescale_can_underflow(dtype: str) -> bool:
    """Whether `rescale` can meet values below the smallest normal for tiles stored as
    `dtype` ("float16" or "bfloat16"); the kernels skip its flush when not. A nonzero fp16
    is at least 2^-24 and each scale at most exp(10) < 2^15, so a rescaled fp16 value is
    at least ~2^-55; a bf16 input can be as small as TINY_INPUT."""
    return dtype != "float16"


def imbalance(std_col: np.ndarray, std_row: np.ndarray) -> np.ndarray:
    def ratio(s):
        hi = np.maximum(s.max(axis=(-2, -1)), IMB_FLOOR)
        lo = np.maximum(s.min(axis=(-2, -1)), IMB_FLOOR)
        return hi / lo

    return ratio(std_col) + ratio(std_row)


def clamp(x, lo, hi):
    return np.minimum(np.maximum(x, lo), hi)


def normalize(x: np.ndarray, iters: int = DEFAULT_ITERS):
    """Variance-normalize X [N, R, C]: returns column scales c [N, 1, C] and row scales
    r [N, R, 1] of the most balanced iterate (the identity included, ties to the later)."""
    n, rows, cols = x.shape
    c = np.ones((n, 1, cols), F32)
    r = np.ones((n, rows, 1), F32)
    y = rescale(x, c, r)
    s_col = std(y, axis=-2)
    best = imbalance(s_col, std(y, axis=-1))
    best_c, best_r = c, r
    for _ in range(iters):
        c = clamp(c * clamp(s_col, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = rescale(x, c, r)
        r = clamp(r * clamp(std(y, axis=-1), STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = rescale(x, c, r)
        s_col = std(y, axis=-2)
        imb = imbalance(s_col, std(y, axis=-1))
        keep = imb <= best
        best = np.where(keep, imb, best)
        best_c = np.where(keep[:, None, None], c, best_c)
        best_r = np.where(keep[:, None, None], r, best_r)
    return best_c, best_r


def rtn(b: np.ndarray, bits: int):
    """Asymmetric round-to-nearest-even per row of B [N, R, C] -> codes, delta, lo."""
    qmax = (1 << bits) - 1
    lo = b.min(axis=-1, keepdims=True)
    hi = b.max(axis=-1, keepdims=True)
    delta = np.maximum((hi - lo) * F32(1.0 / qmax), DELTA_MIN)
    q = clamp(np.rint((b - lo) / delta), F32(0), F32(qmax))
    return q.astype(np.uint8), delta, lo


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, LSB first: value i -> byte i // (8 // bits),
    bit (i % (8 // bits)) * bits."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).astype(np.uint32)
    shifts = np.arange(per, dtype=np.uint32) * bits
    return (q << shifts).sum(axis=-1).astype(np.uint8)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    q = (w[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return q.reshape(*w.shape[:-1], w.shape[-1] * per)


def quantize_tile(x: np.ndarray, bits: int, iters: int):
    """Quantize X [N, R, C] along its rows -> (codes [N, R, C] uint8,
    absorbed row scale [N, R], absorbed row zero [N, R], column scale [N, C]), fp16."""
    c, r = normalize(x, iters)
    q, delta, lo = rtn(rescale(x, c, r), bits)
    f16 = np.float16
    return q, to_storage(r * delta, f16)[..., 0], to_storage(r * lo, f16)[..., 0], \
        to_storage(c, f16)[:, 0, :]


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(x.shape[0], -1)


def quantize(k_rot: np.ndarray, v_rot: np.ndarray, preset: str, iters: int = DEFAULT_ITERS):
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    lay = check_tiles(k_rot.shape, k_rot.dtype, v_rot.shape, v_rot.dtype, preset)
    check_iters(iters)
    # Tiles are independent; a few at a time keep the temporaries in the CPU's caches
    # (3x faster than one pass over thousands of tiles).
    return np.concatenate([np.zeros((0, lay.record_bytes), np.uint8)] + [
        _quantize_tiles(k_rot[i: i + CHUNK_TILES], v_rot[i: i + CHUNK_TILES], lay, iters)
        for i in range(0, k_rot.shape[0], CHUNK_TILES)])


def _quantize_tiles(k_rot: np.ndarray, v_rot: np.ndarray, lay: Layout, iters: int):
    n, p = k_rot.shape[0], lay.preset
    xk = np.swapaxes(canonicalize(k_rot), -1, -2)  # [N, D, G]: rows are channels
    xv = canonicalize(v_rot)  # [N, G, D]: rows are tokens
    qk, a_k, z_k, tau_k = quantize_tile(xk, p.k_bits, iters)
    qv, a_v, z_v, sigma_v = quantize_tile(xv, p.v_bits, iters)
    parts = [
        pack(qk, p.k_bits).reshape(n, -1), _fp16_bytes(a_k), _fp16_bytes(z_k),
        _fp16_bytes(tau_k), pack(qv, p.v_bits).reshape(n, -1), _fp16_bytes(sigma_v),
        _fp16_bytes(a_v), _fp16_bytes(z_v),
    ]
    out = np.zeros((n, lay.record_bytes), np.uint8)
    out[:, : lay.raw_bytes] = np.concatenate(parts, axis=1)
    return out


def field(records: np.ndarray, lay: Layout, name: str) -> np.ndarray:
    f = lay.fields[name]
    raw = np.ascontiguousarray(records[:, f.offset : f.offset + f.nbytes])
    return raw if name.endswith("codes") else raw.view("<f2").astype(F32)


def dequantize(records: np.ndarray, preset: str, head_dim: int):
    """Records [N, record_bytes] -> K, V [N, G, D] float32 in the rotated frame."""
    lay = check_records(records.shape, records.dtype, preset, head_dim)
    p, d, g, n = lay.preset, head_dim, lay.preset.tile, records.shape[0]
    qk = unpack(field(records, lay, "k_codes").reshape(n, d, -1), p.k_bits).astype(F32)
    qv = unpack(field(records, lay, "v_codes").reshape(n, g, -1), p.v_bits).astype(F32)
    a_k, z_k, tau_k = (field(records, lay, f) for f in ("a_k", "z_k", "tau_k"))
    sigma_v, a_v, z_v = (field(records, lay, f) for f in ("sigma_v", "a_v", "z_v"))
    k = (qk * a_k[:, :, None] + z_k[:, :, None]) * tau_k[:, None, :]
    v = (qv * a_v[:, :, None] + z_v[:, :, None]) * sigma_v[:, None, :]
    return np.swapaxes(k, -1, -2), v
