"""The KVarN tile codec in plain torch ops: the NumPy oracle (kvarn.oracle) step by step.

Runs on CPU and CUDA tensors and gives the oracle's bytes on both, because every op
below is one correctly rounded IEEE float32 operation in eager mode:

* no fused ops (addcmul, lerp, ...): eager torch never contracts a * b + c;
* divisions are tensor / tensor (torch turns a division by a Python scalar into a
  multiply by its reciprocal); constants are float32 values rounded once, as in the oracle;
* sums are the oracle's adjacent-pair tree (`pair_sum`), never torch.sum;
* torch.round is round-half-even, float16/bfloat16 casts are IEEE;
* torch.sqrt is not correctly rounded on CPU (its float32 vector path is off by an ulp
  for ~1 in 6 inputs), so `sqrt_rn` computes the IEEE float32 square root explicitly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import Tensor

from kvarn.checks import check_iters, check_records, check_rotate_input, check_tiles
from kvarn.format import Layout

F32 = np.float32
# Python floats holding float32 values exactly, so torch's scalar ops see the oracle's value.
FP16_MAX = float(F32(65504.0))
BF16_MAX = float(F32(float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)))
TINY_INPUT = float(F32(2.0**-100))
F32_MIN_NORMAL = float(F32(np.finfo(np.float32).tiny))
STD_MIN, STD_MAX = float(F32(1e-3)), float(F32(1e3))
SCALE_MIN, SCALE_MAX = float(F32(np.exp(-0.3))), float(F32(np.exp(10.0)))
IMB_FLOOR = float(F32(1e-8))
DELTA_MIN = float(F32(1e-10))
DEFAULT_ITERS = 8
_STORAGE_MAX = {torch.float16: FP16_MAX, torch.bfloat16: BF16_MAX}


def f32_const(x: float) -> float:
    """x rounded once to float32, as a Python float (exact in torch's float32 scalar ops)."""
    return float(F32(x))


def canonicalize(x: Tensor) -> Tensor:
    """float32 copy of x with NaN -> 0, |x| saturated at 65504, |x| < 2^-100 (and -0) -> +0."""
    x = x.to(torch.float32)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    x = torch.clamp(x, -FP16_MAX, FP16_MAX)
    return torch.where(x.abs() < TINY_INPUT, torch.zeros_like(x), x)


def to_storage(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float32 to `dtype` to nearest-even, saturating at its finite range; -0 -> +0."""
    if dtype != torch.float32:
        hi = _STORAGE_MAX[dtype]
        x = torch.clamp(x, -hi, hi)
    y = x.to(dtype)
    return torch.where(y == 0, torch.zeros_like(y), y)


def fwht(x: Tensor) -> Tensor:
    """Unnormalized Walsh-Hadamard transform of the last axis, stage by stage as the oracle:
    stage h pairs element i with i + h inside each block of 2h: a, b -> a + b, a - b."""
    d = x.shape[-1]
    h = 1
    while h < d:
        y = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(x.shape)
        h *= 2
    return x


def rotate(x: Tensor) -> Tensor:
    """Multiply the last axis by the normalized Hadamard matrix (its own inverse); same dtype."""
    check_rotate_input(tuple(x.shape), x.dtype)
    scale = f32_const(1.0 / np.sqrt(x.shape[-1]))
    return to_storage(fwht(canonicalize(x)) * scale, x.dtype)


def pair_sum(x: Tensor, dim: int) -> Tensor:
    """Sum along `dim` (-1 or -2, power-of-two length) by the canonical tree
    ((x0 + x1) + (x2 + x3)) + ..., keeping the axis with length 1."""
    if dim == -2:
        return pair_sum(x.transpose(-1, -2), -1).transpose(-1, -2)
    while x.shape[-1] > 1:
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        x = pairs[..., 0] + pairs[..., 1]
    return x


def sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded float32 square root of x >= 0, on any device.

    A float64 root rounded to float32 is a candidate within one ulp; it is then moved to
    the float32 whose rounding interval holds sqrt(x). The test is exact in float64: a
    midpoint between adjacent float32s has 25 significant bits, so its square (50 bits)
    is exact, and it never equals a float32 x, so there are no ties.
    """
    xd = x.to(torch.float64)
    s = torch.sqrt(xd).to(torch.float32)
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    mid_up = (s.to(torch.float64) + up.to(torch.float64)) * 0.5
    s = torch.where(mid_up * mid_up < xd, up, s)
    down = torch.nextafter(s, torch.zeros_like(s))
    mid_down = (s.to(torch.float64) + down.to(torch.float64)) * 0.5
    return torch.where(mid_down * mid_down > xd, down, s)


def std(x: Tensor, dim: int) -> Tensor:
    """Two-pass Bessel-corrected standard deviation along `dim`, axis kept."""
    n = x.shape[dim]
    mean = pair_sum(x, dim) * f32_const(1.0 / n)
    d = x - mean
    return sqrt_rn(pair_sum(d * d, dim) * f32_const(1.0 / (n - 1)))


def _rcp(x: Tensor) -> Tensor:
    # tensor / tensor: a true IEEE division on every device (1.0 / x may become a reciprocal op)
    return torch.ones_like(x) / x


def rescale(x: Tensor, c: Tensor, r: Tensor) -> Tensor:
    """Y = X * rcp(c)[col] * rcp(r)[row], values below the smallest normal flushed to +0."""
    y = x * _rcp(c)
    y = y * _rcp(r)
    return torch.where(y.abs() < F32_MIN_NORMAL, torch.zeros_like(y), y)


def imbalance(std_col: Tensor, std_row: Tensor) -> Tensor:
    """max/min std ratio over columns plus over rows, per tile -> [N]."""

    def ratio(s: Tensor) -> Tensor:
        hi = torch.clamp(s.amax(dim=(-2, -1)), min=IMB_FLOOR)
        lo = torch.clamp(s.amin(dim=(-2, -1)), min=IMB_FLOOR)
        return hi / lo

    return ratio(std_col) + ratio(std_row)


def normalize(x: Tensor, iters: int = DEFAULT_ITERS) -> tuple[Tensor, Tensor]:
    """Variance-normalize X [N, R, C]: column scales c [N, 1, C] and row scales r [N, R, 1]
    of the most balanced iterate (the identity included, ties to the later)."""
    n, rows, cols = x.shape
    c = torch.ones((n, 1, cols), dtype=torch.float32, device=x.device)
    r = torch.ones((n, rows, 1), dtype=torch.float32, device=x.device)
    y = rescale(x, c, r)
    s_col = std(y, -2)
    best = imbalance(s_col, std(y, -1))
    best_c, best_r = c, r
    for _ in range(iters):
        c = torch.clamp(c * torch.clamp(s_col, STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = rescale(x, c, r)
        r = torch.clamp(r * torch.clamp(std(y, -1), STD_MIN, STD_MAX), SCALE_MIN, SCALE_MAX)
        y = rescale(x, c, r)
        s_col = std(y, -2)
        imb = imbalance(s_col, std(y, -1))
        keep = imb <= best
        best = torch.where(keep, imb, best)
        best_c = torch.where(keep[:, None, None], c, best_c)
        best_r = torch.where(keep[:, None, None], r, best_r)
    return best_c, best_r


def rtn(b: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest-even per row of B [N, R, C] -> codes, delta, lo."""
    qmax = (1 << bits) - 1
    lo = b.amin(dim=-1, keepdim=True)
    hi = b.amax(dim=-1, keepdim=True)
    delta = torch.clamp((hi - lo) * f32_const(1.0 / qmax), min=DELTA_MIN)
    q = torch.clamp(torch.round((b - lo) / delta), 0.0, float(qmax))
    return q.to(torch.uint8), delta, lo


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack codes along the last axis, LSB first: value i -> byte i // (8 // bits),
    bit (i % (8 // bits)) * bits."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).to(torch.int32)
    out = q[..., 0]
    for i in range(1, per):
        out = out | (q[..., i] << (i * bits))
    return out.to(torch.uint8)


def unpack(w: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=w.device) * bits
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(*w.shape[:-1], w.shape[-1] * per)


def quantize_tile(x: Tensor, bits: int, iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize X [N, R, C] along its rows -> (codes [N, R, C] uint8, absorbed row scale
    [N, R], absorbed row zero [N, R], column scale [N, C]), the last three fp16."""
    c, r = normalize(x, iters)
    q, delta, lo = rtn(rescale(x, c, r), bits)
    f16 = torch.float16
    return q, to_storage(r * delta, f16)[..., 0], to_storage(r * lo, f16)[..., 0], \
        to_storage(c, f16)[:, 0, :]


def _fp16_bytes(x: Tensor) -> Tensor:
    """[N, M] fp16 -> [N, 2M] bytes, little-endian like every host and GPU torch runs on."""
    return x.contiguous().view(torch.uint8)


def quantize(k_rot: Tensor, v_rot: Tensor, preset: str, iters: int = DEFAULT_ITERS) -> Tensor:
    """Rotated K and V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    lay = check_tiles(tuple(k_rot.shape), k_rot.dtype, tuple(v_rot.shape), v_rot.dtype, preset)
    check_iters(iters)
    n, p = k_rot.shape[0], lay.preset
    xk = canonicalize(k_rot).transpose(-1, -2).contiguous()  # [N, D, G]: rows are channels
    xv = canonicalize(v_rot)  # [N, G, D]: rows are tokens
    qk, a_k, z_k, tau_k = quantize_tile(xk, p.k_bits, iters)
    qv, a_v, z_v, sigma_v = quantize_tile(xv, p.v_bits, iters)
    parts = [
        pack(qk, p.k_bits).flatten(1), _fp16_bytes(a_k), _fp16_bytes(z_k),
        _fp16_bytes(tau_k), pack(qv, p.v_bits).flatten(1), _fp16_bytes(sigma_v),
        _fp16_bytes(a_v), _fp16_bytes(z_v),
    ]
    out = torch.zeros((n, lay.record_bytes), dtype=torch.uint8, device=k_rot.device)
    out[:, : lay.raw_bytes] = torch.cat(parts, dim=1)
    return out


def field(records: Tensor, lay: Layout, name: str) -> Tensor:
    """One record field: raw code bytes, or an fp16 field widened to float32."""
    f = lay.fields[name]
    raw = records[:, f.offset : f.offset + f.nbytes].contiguous()
    return raw if name.endswith("codes") else raw.view(torch.float16).to(torch.float32)


def dequantize(records: Tensor, preset: str, head_dim: int) -> tuple[Tensor, Tensor]:
    """Records [N, record_bytes] -> K, V [N, G, D] float32 in the rotated frame."""
    lay = check_records(tuple(records.shape), records.dtype, preset, head_dim)
    p, d, g, n = lay.preset, head_dim, lay.preset.tile, records.shape[0]
    k_codes = field(records, lay, "k_codes").reshape(n, d, g * p.k_bits // 8)
    v_codes = field(records, lay, "v_codes").reshape(n, g, d * p.v_bits // 8)
    qk = unpack(k_codes, p.k_bits).to(torch.float32)
    qv = unpack(v_codes, p.v_bits).to(torch.float32)
    a_k, z_k, tau_k = (field(records, lay, f) for f in ("a_k", "z_k", "tau_k"))
    sigma_v, a_v, z_v = (field(records, lay, f) for f in ("sigma_v", "a_v", "z_v"))
    # separate multiply and add, as the oracle: no fused multiply-add
    k = (qk * a_k[:, :, None] + z_k[:, :, None]) * tau_k[:, None, :]
    v = (qv * a_v[:, :, None] + z_v[:, :, None]) * sigma_v[:, None, :]
    return k.transpose(-1, -2).contiguous(), v
