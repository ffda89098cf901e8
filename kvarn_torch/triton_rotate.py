"""Triton kernel: the normalized Hadamard rotation of the last axis (kvarn.oracle.rotate).

One program rotates BLOCK_ROWS rows of D values: canonicalize, the D-point fast
Walsh-Hadamard butterflies stage by stage exactly as oracle.fwht, a multiply by the
float32 constant 1/sqrt(D), and a saturating round to the storage dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from kvarn.checks import check_rotate_input
from kvarn_torch.triton_common import as_kind, f32, per_program, rotate_rows, storage_kind

BLOCK_ROWS = 16  # rows per program: 16 x 256 floats at most, 16 per thread at 8 warps
NUM_WARPS = 8


@triton.jit(do_not_specialize=["n_rows"])  # one variant whatever the step's token count
def _rotate_kernel(
    x_ptr, out_ptr, n_rows,
    D: tl.constexpr, LOG_D: tl.constexpr, SCALE: tl.constexpr,
    KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs = rows[:, None] * D + tl.arange(0, D)[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, rotate_rows(x, BLOCK_ROWS, D, LOG_D, SCALE, KIND), mask=mask)


def rotate(x: Tensor) -> Tensor:
    """Multiply the last axis by the normalized Hadamard matrix; same dtype out."""
    check_rotate_input(tuple(x.shape), x.dtype)
    d = x.shape[-1]
    rows = x.reshape(-1, d).contiguous()
    out = torch.empty_like(rows)
    n_rows = rows.shape[0]
    if n_rows:
        block_rows = per_program(_rotate_kernel, n_rows, d, compiled=BLOCK_ROWS)
        grid = (triton.cdiv(n_rows, block_rows),)
        _rotate_kernel[grid](
            as_kind(rows), as_kind(out), n_rows,
            D=d, LOG_D=d.bit_length() - 1, SCALE=f32(1.0 / np.sqrt(d)),
            KIND=storage_kind(x.dtype), BLOCK_ROWS=block_rows,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
    return out.reshape(x.shape)
