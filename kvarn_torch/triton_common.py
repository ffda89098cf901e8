"""Triton building blocks shared by the rotate, write, quantize and attention kernels.

Each helper is one step of kvarn.oracle written with ops whose result is the same on a
GPU and in the Triton interpreter (TRITON_INTERPRET=1, numpy):

* bfloat16 is never converted with `.to()`: the interpreter truncates fp32 -> bf16, so
  bf16 values travel as int16 bits and are widened / rounded with integer ops;
* sums are the oracle's adjacent-pair tree, never tl.sum over more than two terms
  (its order differs between the GPU and the interpreter): see triton_quantize;
* division and square root use tl.div_rn / tl.sqrt_rn (plain `/` and tl.sqrt are
  approximate on the GPU; triton_quantize emits their fast paths alone, as inline PTX,
  where its operands are in range), and launches pass enable_fp_fusion=False.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

F32 = np.float32


def f32(x: float) -> float:
    """x rounded once to float32, as a Python float: the oracle's `np.float32(x)`."""
    return float(F32(x))


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in the Triton interpreter (TRITON_INTERPRET=1 at definition)."""
    return isinstance(kernel, InterpretedFunction)


def per_program(kernel, n: int, item_numel: int, compiled: int) -> int:
    """Items (tiles, rows) per program of `kernel` for `n` items of `item_numel` elements:
    `compiled` on a GPU. Triton's interpreter costs per program and per operation, hardly
    per element (~0.4 s a program of the quantize kernel), so there a program takes as many
    items as fit Triton's largest tensor (a power of two, no more than n needs)."""
    if not interpreted(kernel):
        return compiled
    return min(tl.TRITON_MAX_TENSOR_NUMEL // item_numel, triton.next_power_of_2(n))


def runtime_int(kernel, x: int) -> int | np.int32:
    """A runtime int argument for `kernel`. The interpreter wraps a Python int in a
    1-element array, which numpy >= 2.5 refuses as a range() bound; a numpy int passes."""
    return np.int32(x) if interpreted(kernel) else x


# Kernel constants (float32 values, exact as Python floats); see kvarn.oracle.
FP16_MAX = tl.constexpr(f32(65504.0))
BF16_MAX = tl.constexpr(f32(3.3895313892515355e38))  # largest finite bfloat16
TINY_INPUT = tl.constexpr(f32(2.0**-100))
F32_MIN_NORMAL = tl.constexpr(f32(np.finfo(np.float32).tiny))

# How a tensor of a storage dtype is handed to a kernel (bf16 goes as its int16 bits).
KIND_FP16, KIND_BF16, KIND_FP32 = 0, 1, 2
_KINDS = {torch.float16: KIND_FP16, torch.bfloat16: KIND_BF16, torch.float32: KIND_FP32}


def storage_kind(dtype: torch.dtype) -> int:
    """The KIND constexpr of a float16 / bfloat16 / float32 tensor."""
    return _KINDS[dtype]


def as_kind(x: torch.Tensor) -> torch.Tensor:
    """x as a kernel reads it: bfloat16 as its int16 bits (a view), the others as they are."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def check_pool_layout(pool_k: torch.Tensor, pool_v: torch.Tensor) -> None:
    """The kernels address the K and V tail pools with one set of strides, unit along D."""
    if pool_k.stride() != pool_v.stride() or pool_k.stride(-1) != 1:
        raise ValueError("pool_k and pool_v must have the same strides and a contiguous last "
                         f"axis; got {pool_k.stride()} and {pool_v.stride()}")


@triton.jit
def widen_f32(raw, KIND: tl.constexpr):
    """Loaded fp16 / bf16-bits (int16) / fp32 values -> float32, exactly."""
    if KIND == 1:
        bits = raw.to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def hadamard(x, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of each row of x [ROWS, D] (float32), the
    butterflies stage by stage exactly as oracle.fwht.

    Stage s pairs i with i + 2**s in each block of 2**(s+1): view [.., D / 2**(s+1), 2,
    2**s], bring the pair axis last so split() yields (a, b), join (a + b, a - b), and
    move it back."""
    for s in tl.static_range(LOG_D):
        y = tl.reshape(x, [ROWS, D >> (s + 1), 2, 1 << s], can_reorder=False)
        a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, [ROWS, D], can_reorder=False)
    return x


@triton.jit
def canonicalize(x):
    """NaN -> 0, |x| saturated at 65504, |x| < 2^-100 (and -0) -> +0."""
    x = tl.where(x != x, 0.0, x)
    x = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX)
    return tl.where(tl.abs(x) < TINY_INPUT, 0.0, x)


@triton.jit
def to_fp16(x):
    """Round float32 to float16 (nearest-even), saturating at +-65504; -0 -> +0."""
    h = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX).to(tl.float16)
    return tl.where(h == 0, tl.zeros_like(h), h)


@triton.jit
def to_bf16_bits(x):
    """Round float32 to bfloat16 (nearest-even, saturating, -0 -> +0) as int16 bits.

    Integer rounding: add 0x7FFF plus the lowest kept bit, keep the high half. Exact for
    every finite input, and identical on the GPU and in the interpreter.
    """
    x = tl.minimum(tl.maximum(x, -BF16_MAX), BF16_MAX)
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    u = tl.where((u & 0x7FFF) == 0, tl.zeros_like(u), u)
    return u.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def narrow(y, KIND: tl.constexpr):
    """float32 -> the storage kind: fp16, bf16 bits (int16) or fp32 (-0 -> +0 in each)."""
    if KIND == 0:
        return to_fp16(y)
    elif KIND == 1:
        return to_bf16_bits(y)
    else:
        return tl.where(y == 0, 0.0, y)


@triton.jit
def rotate_rows(raw, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr,
                SCALE: tl.constexpr, KIND: tl.constexpr):
    """oracle.rotate of loaded rows [ROWS, D] of a storage kind, in that kind: canonicalize,
    the butterflies, one multiply by the float32 1/sqrt(D), round."""
    x = hadamard(canonicalize(widen_f32(raw, KIND)), ROWS, D, LOG_D)
    return narrow(x * SCALE, KIND)


@triton.jit
def store_fp16_bytes(ptrs, h):
    """Write fp16 values little-endian into a uint8 buffer: byte 2i low, 2i+1 high.

    `ptrs` points at the low byte of each value; records hold no fp16-aligned view.
    """
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(ptrs, (bits & 0xFF).to(tl.uint8))
    tl.store(ptrs + 1, (bits >> 8).to(tl.uint8))
