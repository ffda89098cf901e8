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
from kvarn_torch.triton_common import (
    KIND_BF16,
    KIND_FP16,
    KIND_FP32,
    canonicalize,
    f32,
    to_bf16_bits,
    to_fp16,
    widen_f32,
)

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
    x = canonicalize(widen_f32(tl.load(x_ptr + offs, mask=mask, other=0), KIND))

    # Stage h pairs i with i + h in each block of 2h: view [.., D/2h, 2, h], bring the
    # pair axis last so split() yields (a, b), join (a + b, a - b), and move it back.
    for s in tl.static_range(LOG_D):  # h = 1 << s
        y = tl.reshape(x, [BLOCK_ROWS, D >> (s + 1), 2, 1 << s], can_reorder=False)
        a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, [BLOCK_ROWS, D], can_reorder=False)

    y = x * SCALE
    if KIND == 0:
        tl.store(out_ptr + offs, to_fp16(y), mask=mask)
    elif KIND == 1:
        tl.store(out_ptr + offs, to_bf16_bits(y), mask=mask)
    else:
        tl.store(out_ptr + offs, tl.where(y == 0, 0.0, y), mask=mask)


_KINDS = {torch.float16: KIND_FP16, torch.bfloat16: KIND_BF16, torch.float32: KIND_FP32}


def rotate(x: Tensor) -> Tensor:
    """Multiply the last axis by the normalized Hadamard matrix; same dtype out."""
    check_rotate_input(tuple(x.shape), x.dtype)
    d = x.shape[-1]
    rows = x.reshape(-1, d).contiguous()
    out = torch.empty_like(rows)
    n_rows = rows.shape[0]
    if n_rows:
        kind = _KINDS[x.dtype]
        as_bits = (lambda t: t.view(torch.int16)) if kind == KIND_BF16 else (lambda t: t)
        grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
        _rotate_kernel[grid](
            as_bits(rows), as_bits(out), n_rows,
            D=d, LOG_D=d.bit_length() - 1, SCALE=f32(1.0 / np.sqrt(d)),
            KIND=kind, BLOCK_ROWS=BLOCK_ROWS,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
    return out.reshape(x.shape)
