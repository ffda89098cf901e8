"""The quantize kernel's inline-PTX fast paths (kvarn_torch.triton_quantize: _rcp, _sqrt,
_div) against tl.div_rn / tl.sqrt_rn, bit for bit, on the ranges the kernel feeds them:
every float32 of [DELTA_MIN, 2^17) for the reciprocal (the clamped scales and the RTN
steps), every float32 of [1, 4) and a strided sample of [2^-100, 2^50] for the square
root (variances), 2^24 random quotients in [0, 15.5] for the division, half of them next
to the RTN ties. The quantize tests compare the kernel's bytes with the oracle's; these
check the helpers beyond the tiles those draw.

Needs a CUDA GPU: Triton's interpreter runs no PTX (there the helpers are tl.div_rn and
tl.sqrt_rn themselves). A few seconds on an H200, mostly compiling."""

import numpy as np
import pytest
import torch

import kvarn_torch  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvarn_torch.triton_quantize import DELTA_MIN, VAR_FLOOR, _div, _rcp, _sqrt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCK = 1024
QUOTIENT_MAX = 15.5  # the largest RTN quotient: QMAX = 15 plus rounding


def _bits(x: float) -> int:
    """The float32 bit pattern of x (rounded to float32) as an int."""
    return int(np.array(x, np.float32).view(np.int32))


@triton.jit
def _unary_mismatches(out_ptr, start, stride, n, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """Count the floats with bit patterns start + i * stride, i < n, where the fast path
    differs from the correctly rounded op."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = (start + i * stride).to(tl.int32).to(tl.float32, bitcast=True)
    if SQRT:
        got = _sqrt(x, True)
        want = tl.sqrt_rn(x)
    else:
        got = _rcp(x, True)
        want = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), x)
    bad = (got.to(tl.int32, bitcast=True) != want.to(tl.int32, bitcast=True)) & (i < n)
    tl.atomic_add(out_ptr, tl.sum(bad.to(tl.int32)))


@triton.jit
def _div_mismatches(a_ptr, d_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """Count the pairs (a, d) where _div(a, d, _rcp(d)) differs from tl.div_rn(a, d)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    a = tl.load(a_ptr + i, mask=mask, other=0.0)
    d = tl.load(d_ptr + i, mask=mask, other=1.0)
    got = _div(a, d, _rcp(d, True), True)
    bad = (got.to(tl.int32, bitcast=True) != tl.div_rn(a, d).to(tl.int32, bitcast=True)) & mask
    tl.atomic_add(out_ptr, tl.sum(bad.to(tl.int32)))


def _unary(sqrt: bool, lo: float, hi: float, stride: int = 1) -> tuple[int, int]:
    """(mismatches, floats checked) over every `stride`-th float32 of [lo, hi)."""
    start = _bits(lo)
    n = -(-(_bits(hi) - start) // stride)
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    _unary_mismatches[(triton.cdiv(n, BLOCK),)](out, start, stride, n, sqrt, BLOCK,
                                                num_warps=4, enable_fp_fusion=False)
    return int(out.item()), n


def test_rcp_every_float_of_its_range():
    bad, n = _unary(False, DELTA_MIN.value, 2.0**17)
    assert n > 4 * 10**8 and bad == 0, f"{bad} of {n} reciprocals differ from div_rn(1, x)"


@pytest.mark.parametrize("lo, hi, stride", [(1.0, 4.0, 1), (VAR_FLOOR.value, 2.0**50, 7)],
                         ids=["every-float-1-4", "every-7th-float-2^-100-2^50"])
def test_sqrt(lo, hi, stride):
    bad, n = _unary(True, lo, hi, stride)
    assert bad == 0, f"{bad} of {n} square roots differ from sqrt_rn"


def test_div_random_quotients():
    gen = torch.Generator(device="cuda").manual_seed(2026)
    n = 1 << 24
    d = torch.exp(torch.empty(n, device="cuda").uniform_(
        float(np.log(DELTA_MIN.value)), float(np.log(2.0**17)), generator=gen))
    u = torch.rand(n, device="cuda", generator=gen) * QUOTIENT_MAX
    near = torch.arange(n, device="cuda") % 2 == 1  # next to an integer or a half-integer
    jitter = (torch.rand(n, device="cuda", generator=gen) - 0.5) * 1e-5
    u = torch.where(near, (torch.round(u * 2) / 2 + jitter).clamp(0.0, QUOTIENT_MAX), u)
    u[:4] = torch.tensor([0.0, 0.5, 1.5, QUOTIENT_MAX])
    d = d.clamp(DELTA_MIN.value, float(np.nextafter(np.float32(2.0**17), np.float32(0))))
    a = d * u
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    _div_mismatches[(triton.cdiv(n, BLOCK),)](a, d, n, out, BLOCK, num_warps=4,
                                              enable_fp_fusion=False)
    assert int(out.item()) == 0, f"{int(out.item())} of {n} quotients differ from div_rn"
