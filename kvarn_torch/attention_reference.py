"""Exact float32 attention over a KVarN cache: the reference the kernels are tested against.

The torch mirror of `kvarn_jax.attention_reference`. Reads every block through
`cache.gather_kv` (pool blocks as stored, quantized blocks dequantized), rotates the
query by the same Hadamard, and un-rotates the output; scores are invariant because the
rotation is orthonormal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvarn_torch import reference
from kvarn_torch.cache import KVarNCache, gather_kv


def attention(q: Tensor, cache: KVarNCache, block_tables: Tensor, seq_lens: Tensor,
              query_lens: Tensor | None = None, *, max_blocks: int | None = None,
              causal: bool = True, softmax_scale: float | None = None,
              chunk_invariant: bool = False) -> Tensor:
    """q [B, Sq, Hq, D] (the last `query_lens[b]` tokens of each sequence, already
    appended; rows past query_len are ignored) -> out [B, Sq, Hq, D] float32.

    Row i of sequence b sits at position seq_len - query_len + i and attends to positions
    up to it (causal) or to the whole sequence (causal=False). query_lens defaults to Sq;
    max_blocks to all columns of block_tables. chunk_invariant: a row reads the blocks
    before its own from their records, the first `cache.sink_blocks` excepted."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    if d != cache.head_dim or hq % hk:
        raise ValueError(f"q must be [B, Sq, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"{hk} KV heads; got {tuple(q.shape)}")
    if query_lens is None:
        query_lens = torch.full((b,), sq, dtype=torch.int64, device=q.device)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    k, v = gather_kv(cache, block_tables, max_blocks)  # [B, T, Hk, D]
    qr = reference.rotate(q.float()).reshape(b, sq, hk, hq // hk, d)
    s = torch.einsum("bqhgd,bthd->bhgqt", qr, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    row = (seq_lens.long() - query_lens.long())[:, None] + torch.arange(sq, device=q.device)
    limit = row + 1 if causal else seq_lens.long()[:, None].expand(b, sq)
    mask = pos[None, None, :] < limit[:, :, None]  # [B, Sq, T]
    if chunk_invariant:  # the records of the blocks before each row's own, sinks excepted
        g = cache.tile
        k_rec, v_rec = gather_kv(cache, block_tables, max_blocks, cache.sink_blocks)
        rec = ((pos[None, None, :] // g < row[:, :, None] // g)
               & (pos[None, None, :] >= cache.sink_blocks * g))[:, None, None]  # [B,1,1,Sq,T]
        s = torch.where(rec, torch.einsum("bqhgd,bthd->bhgqt", qr, k_rec) * scale, s)
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if chunk_invariant:
        out = (torch.einsum("bhgqt,bthd->bqhgd", torch.where(rec, 0, p), v)
               + torch.einsum("bhgqt,bthd->bqhgd", torch.where(rec, p, 0), v_rec))
    else:
        out = torch.einsum("bhgqt,bthd->bqhgd", p, v)
    return reference.rotate(out.reshape(b, sq, hq, d).contiguous())
