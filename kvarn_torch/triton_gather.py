"""Triton kernel: one sequence's cached K/V as dense tensors (rotated frame).

For attention kernels that take dense K/V (FlashAttention on a long prefill chunk, whose
query rows would each re-read and re-dequantize the whole context in the paged kernel):
every block of the sequence is read once, from its record (dequantized exactly as
`kvarn.oracle.dequantize`, then rounded to the cache's dtype) or from the tail pool (as
stored). The caller rotates the queries and rotates the output back (attention is
invariant under the orthonormal rotation of q and K; V's rotation passes to the output).

Grid (block, KV head, token tile); a program writes TOKENS tokens of one head: small
tiles keep the whole program in registers. The reference is `gather_reference`
(`cache.gather_kv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvarn.format import layout
from kvarn_torch import cache as kvcache
from kvarn_torch.cache import KVarNCache

TOKENS = 32  # per program
NUM_WARPS = 4


@triton.jit
def _codes(words_ptr, rows, cols, ROW_WORDS: tl.constexpr, BITS: tl.constexpr):
    """Codes [R, C] packed LSB-first along each row of int32 words (ROW_WORDS per row)."""
    PER_WORD: tl.constexpr = 32 // BITS
    w = tl.load(words_ptr + rows[:, None] * ROW_WORDS + cols[None, :] // PER_WORD)
    return ((w >> ((cols[None, :] % PER_WORD) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit(do_not_specialize=["records_from", "records_to", "page_stride_block",
                               "page_stride_head",
                               "pool_stride_slot", "pool_stride_tok", "pool_stride_head"],
            do_not_specialize_on_alignment=["block_table_ptr"])
def _gather_kernel(
    words_ptr, halves_ptr, pool_k_ptr, pool_v_ptr, block_table_ptr, block_to_slot_ptr,
    k_out_ptr, v_out_ptr, records_from, records_to,
    page_stride_block, page_stride_head, pool_stride_slot, pool_stride_tok, pool_stride_head,
    D: tl.constexpr, G: tl.constexpr, HK: tl.constexpr, TOKENS: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_CODES: tl.constexpr, A_K: tl.constexpr,
    Z_K: tl.constexpr, TAU_K: tl.constexpr, V_CODES: tl.constexpr, SIGMA_V: tl.constexpr,
    A_V: tl.constexpr, Z_V: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) * TOKENS + tl.arange(0, TOKENS)  # tokens of the block
    d = tl.arange(0, D)
    blk = tl.maximum(tl.load(block_table_ptr + i).to(tl.int64), 0)  # -1 past the end
    slot = tl.load(block_to_slot_ptr + blk)
    out = ((i * G + t[:, None]).to(tl.int64) * HK + h) * D + d[None, :]
    if (slot >= 0) & ((i < records_from) | (i >= records_to)):  # in the tail pool, as stored
        at = slot.to(tl.int64) * pool_stride_slot + h * pool_stride_head
        ptrs = at + t[:, None] * pool_stride_tok + d[None, :]
        tl.store(k_out_ptr + out, tl.load(pool_k_ptr + ptrs))
        tl.store(v_out_ptr + out, tl.load(pool_v_ptr + ptrs))
    else:  # K[t, d] = (c * a_K[d] + z_K[d]) * tau_K[t], V[t, d] = (c * a_V[t] + z_V[t]) * sigma_V[d]
        rec = blk * page_stride_block + h * page_stride_head  # bytes
        half = rec // 2
        c_k = _codes(words_ptr + rec // 4 + K_CODES // 4, d, t, G * K_BITS // 32, K_BITS)
        a_k = tl.load(halves_ptr + half + A_K // 2 + d).to(tl.float32)
        z_k = tl.load(halves_ptr + half + Z_K // 2 + d).to(tl.float32)
        tau = tl.load(halves_ptr + half + TAU_K // 2 + t).to(tl.float32)
        k = tl.trans((c_k * a_k[:, None] + z_k[:, None]) * tau[None, :])
        tl.store(k_out_ptr + out, k.to(k_out_ptr.dtype.element_ty))
        c_v = _codes(words_ptr + rec // 4 + V_CODES // 4, t, d, D * V_BITS // 32, V_BITS)
        a_v = tl.load(halves_ptr + half + A_V // 2 + t).to(tl.float32)
        z_v = tl.load(halves_ptr + half + Z_V // 2 + t).to(tl.float32)
        sigma = tl.load(halves_ptr + half + SIGMA_V // 2 + d).to(tl.float32)
        v = (c_v * a_v[:, None] + z_v[:, None]) * sigma[None, :]
        tl.store(v_out_ptr + out, v.to(v_out_ptr.dtype.element_ty))


def gather(cache: KVarNCache, block_table: Tensor, num_blocks: int,
           records_from: int | None = None,
           records_to: int | None = None) -> tuple[Tensor, Tensor]:
    """K, V [num_blocks * G, Hk, D] in the cache's dtype (rotated frame) of the sequence
    whose blocks are block_table[:num_blocks] (a 1-D int32/int64 table on the cache's
    device). Positions past the sequence's length hold don't-care values. Blocks from
    index `records_from` on, up to `records_to` (default: the end), are read from their
    records even while in the pool (written ahead by `cache.snapshot`: chunk-invariant
    reads); a table may list a block twice, once in that range and once past it."""
    if block_table.dim() != 1 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be one sequence's 1-D int32/int64 table; got "
                         f"{block_table.dtype} {list(block_table.shape)}")
    if not 0 <= num_blocks <= block_table.shape[0]:
        raise ValueError(f"num_blocks must be in [0, {block_table.shape[0]}]; got {num_blocks}")
    if block_table.device != cache.device:
        raise ValueError(f"block_table is on {block_table.device}, the cache on {cache.device}")
    hk, g, d = cache.num_kv_heads, cache.tile, cache.head_dim
    k = torch.empty((num_blocks * g, hk, d), dtype=cache.dtype, device=cache.device)
    v = torch.empty_like(k)
    if num_blocks == 0:
        return k, v
    if cache.pool_k.stride() != cache.pool_v.stride() or cache.pool_k.stride(3) != 1:
        raise ValueError("pool_k and pool_v must have the same strides, contiguous last axis")
    lay = layout(cache.preset, d)
    p = lay.preset
    pool = cache.pool_k.stride()
    _gather_kernel[(num_blocks, hk, g // TOKENS)](
        cache.pages.view(torch.int32), cache.pages.view(torch.float16), cache.pool_k,
        cache.pool_v, block_table, cache.block_to_slot, k, v,
        num_blocks if records_from is None else records_from,
        num_blocks if records_to is None else records_to,
        cache.pages.stride(0), cache.pages.stride(1), pool[0], pool[1], pool[2],
        D=d, G=g, HK=hk, TOKENS=TOKENS, K_BITS=p.k_bits, V_BITS=p.v_bits,
        K_CODES=lay.k_codes.offset, A_K=lay.a_k.offset, Z_K=lay.z_k.offset,
        TAU_K=lay.tau_k.offset, V_CODES=lay.v_codes.offset, SIGMA_V=lay.sigma_v.offset,
        A_V=lay.a_v.offset, Z_V=lay.z_v.offset, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return k, v


def gather_reference(cache: KVarNCache, block_table: Tensor, num_blocks: int,
                     records_from: int | None = None,
                     records_to: int | None = None) -> tuple[Tensor, Tensor]:
    """`gather` from the torch reference, in float32."""
    k, v = kvcache.gather_kv(cache, block_table[None], num_blocks, records_from, records_to)
    return k[0], v[0]
