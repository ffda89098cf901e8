"""The public torch API of the KVarN tile codec, dispatching to the Triton kernels or the
torch reference. Both give kvarn.oracle's bytes; `impl` only picks the speed.

impl="auto" runs Triton on CUDA tensors and the torch reference elsewhere; "triton" on
CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1, which importing kvarn_torch
sets when no GPU is present).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from kvarn_torch import reference, triton_quantize, triton_rotate
from kvarn_torch.triton_common import interpreted

Impl = Literal["auto", "reference", "triton"]
IMPLS = ("auto", "reference", "triton")
DEFAULT_ITERS = reference.DEFAULT_ITERS


def use_triton(impl: str, x: Tensor, kernel) -> bool:
    """Whether `impl` runs `kernel` (Triton) rather than the torch reference for tensors
    like x; raises for an unknown impl or "triton" on the CPU without the interpreter."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        return x.is_cuda
    if impl == "triton" and not x.is_cuda and not interpreted(kernel):
        raise ValueError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before kvarn_torch "
            f"is imported to interpret the kernels on the CPU; got a tensor on {x.device}"
        )
    return impl == "triton"


def rotate(x: Tensor, impl: Impl = "auto") -> Tensor:
    """Multiply the last axis (head_dim 64/128/256) by the normalized Hadamard matrix;
    fp16/bf16/fp32 in, same dtype out."""
    if use_triton(impl, x, triton_rotate._rotate_kernel):
        return triton_rotate.rotate(x)
    return reference.rotate(x)


def unrotate(x: Tensor, impl: Impl = "auto") -> Tensor:
    """Undo `rotate`: the normalized Hadamard matrix is symmetric and orthonormal, so it is
    its own inverse."""
    return rotate(x, impl)


def quantize(
    k_rot: Tensor, v_rot: Tensor, preset: str, iters: int = DEFAULT_ITERS, impl: Impl = "auto"
) -> Tensor:
    """Rotated K and V tiles [N, tile, head_dim] (fp16/bf16) -> records
    [N, record_bytes] uint8 (see kvarn.format for the layout)."""
    if use_triton(impl, k_rot, triton_quantize._quantize_kernel):
        return triton_quantize.quantize(k_rot, v_rot, preset, iters)
    return reference.quantize(k_rot, v_rot, preset, iters)


def dequantize(
    records: Tensor, preset: str, head_dim: int, impl: Impl = "auto"
) -> tuple[Tensor, Tensor]:
    """Records [N, record_bytes] uint8 -> K, V [N, tile, head_dim] float32, rotated frame.

    There is no separate dequantize kernel: the reference's elementwise torch ops run on the
    records' device for every impl (attention kernels dequantize in place instead).
    """
    use_triton(impl, records, triton_quantize._quantize_kernel)  # validates `impl` only
    return reference.dequantize(records, preset, head_dim)
