"""Triton kernel: a step's new K/V tokens rotated into the tail pool (`cache.write`).

The torch mirror of `kvarn_torch.cache.write`'s reference path, and byte-identical to it:
one program per token rotates the token's K and V rows of every KV head (exactly as
`triton_rotate`) and stores them at (block_to_slot[block], offset) of the pool, or, when
the block holds no slot, counts the token as dropped if its run of tokens opens the block
(offset 0; see `cache.allocate`). One launch for what the reference does in ~40 small
torch ops, per layer and step: in vLLM that was ~15% of a decode step's GPU time.

Tokens of a block are contiguous in the batch and at consecutive offsets (the scheduler's
layout, as `cache.append` requires), so a token's run opens its block exactly when the
token `offset` places before it is the block's offset-0 token.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from torch import Tensor

from kvarn_torch.triton_common import as_kind, check_pool_layout, f32, rotate_rows, storage_kind

NUM_WARPS = 4


@triton.jit
def _rotate_into(src_ptr, dst_ptr, src, dst, mask, ROWS: tl.constexpr, D: tl.constexpr,
                 LOG_D: tl.constexpr, SCALE: tl.constexpr, KIND: tl.constexpr):
    x = tl.load(src_ptr + src, mask=mask, other=0)
    tl.store(dst_ptr + dst, rotate_rows(x, ROWS, D, LOG_D, SCALE, KIND), mask=mask)


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, slot_mapping_ptr, block_to_slot_ptr, pool_k_ptr, pool_v_ptr, dropped_ptr,
    k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    pool_stride_slot, pool_stride_tok, pool_stride_head,
    G: tl.constexpr, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, D: tl.constexpr,
    LOG_D: tl.constexpr, SCALE: tl.constexpr, KIND: tl.constexpr,
):
    t = tl.program_id(0)
    sm = tl.load(slot_mapping_ptr + t).to(tl.int64)
    valid = sm >= 0
    block = tl.where(valid, sm // G, 0)
    offset = tl.where(valid, sm % G, 0)
    slot = tl.load(block_to_slot_ptr + block).to(tl.int64)
    if valid & (slot >= 0):
        h = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = h < HEADS
        dst = slot * pool_stride_slot + offset * pool_stride_tok + h * pool_stride_head + d
        _rotate_into(k_ptr + t.to(tl.int64) * k_stride_t, pool_k_ptr, h * k_stride_h + d, dst,
                     mask, HEADS_P2, D, LOG_D, SCALE, KIND)
        _rotate_into(v_ptr + t.to(tl.int64) * v_stride_t, pool_v_ptr, h * v_stride_h + d, dst,
                     mask, HEADS_P2, D, LOG_D, SCALE, KIND)
    elif valid:
        start = t - offset  # the block's offset-0 token, if this run opens the block
        opens = (start >= 0) & (tl.load(slot_mapping_ptr + tl.maximum(start, 0)) == block * G)
        if opens:
            tl.atomic_add(dropped_ptr, 1)


def write(k: Tensor, v: Tensor, slot_mapping: Tensor, block_to_slot: Tensor, pool_k: Tensor,
          pool_v: Tensor, dropped_tokens: Tensor) -> None:
    """k, v [T, Hk, D] (the pool's dtype, last axis contiguous) rotated into pool_k / pool_v
    [slots, G, Hk, D] at `slot_mapping` [T] (block * G + offset, -1: padding) through
    `block_to_slot`; tokens of blocks without a slot counted in `dropped_tokens`. The
    caller (`cache.write`) has checked shapes and devices."""
    t, hk, d = k.shape
    if t == 0:
        return
    k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (k, v))
    check_pool_layout(pool_k, pool_v)
    g = pool_k.shape[1]
    strides = pool_k.stride()
    _write_kernel[(t,)](
        as_kind(k), as_kind(v), slot_mapping, block_to_slot, as_kind(pool_k), as_kind(pool_v),
        dropped_tokens, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        strides[0], strides[1], strides[2],
        G=g, HEADS=hk, HEADS_P2=triton.next_power_of_2(hk), D=d, LOG_D=d.bit_length() - 1,
        SCALE=f32(1.0 / np.sqrt(d)), KIND=storage_kind(pool_k.dtype),
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
