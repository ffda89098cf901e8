"""Exact float32 attention over a KVarN cache: the reference the kernels are tested against.

Reads every block through `cache.gather_kv` (pool blocks as stored, quantized blocks
dequantized), rotates the query by the same Hadamard, and un-rotates the output; scores
are invariant because the rotation is orthonormal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvarn_jax import reference
from kvarn_jax.cache import KVarNCache, gather_kv


@functools.partial(jax.jit, static_argnames=("max_blocks", "causal", "chunk_invariant"))
def attention(q: jax.Array, cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
              query_lens: jax.Array, *, max_blocks: int, causal: bool = True,
              softmax_scale: float | None = None, chunk_invariant: bool = False) -> jax.Array:
    """q [B, Sq, Hq, D] (the last `query_lens[b]` tokens of each sequence, already
    appended; rows past query_len are ignored) -> out [B, Sq, Hq, D] float32.

    Row i of sequence b sits at position seq_len - query_len + i and attends to positions
    up to it (causal) or to the whole sequence (causal=False). chunk_invariant: a row
    reads the blocks before its own from their records, the first `cache.sink_blocks`
    excepted."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    k, v = gather_kv(cache, block_tables, max_blocks)  # [B, T, Hk, D]
    qr = reference.rotate(q.astype(jnp.float32)).reshape(b, sq, hk, hq // hk, d)
    s = jnp.einsum("bqhgd,bthd->bhgqt", qr, k, precision="highest") * scale
    pos = jnp.arange(k.shape[1])
    row = (seq_lens - query_lens)[:, None] + jnp.arange(sq)[None, :]  # [B, Sq]
    limit = row + 1 if causal else jnp.broadcast_to(seq_lens[:, None], row.shape)
    mask = pos[None, None, :] < limit[:, :, None]  # [B, Sq, T]
    if chunk_invariant:  # the records of the blocks before each row's own, sinks excepted
        g = cache.tile
        k_rec, v_rec = gather_kv(cache, block_tables, max_blocks, cache.sink_blocks)
        rec = ((pos[None, None, :] // g < row[:, :, None] // g)
               & (pos[None, None, :] >= cache.sink_blocks * g))[:, None, None]
        s = jnp.where(rec, jnp.einsum("bqhgd,bthd->bhgqt", qr, k_rec, precision="highest")
                      * scale, s)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    if chunk_invariant:
        out = (jnp.einsum("bhgqt,bthd->bqhgd", jnp.where(rec, 0, p), v, precision="highest")
               + jnp.einsum("bhgqt,bthd->bqhgd", jnp.where(rec, p, 0), v_rec,
                            precision="highest"))
    else:
        out = jnp.einsum("bhgqt,bthd->bqhgd", p, v, precision="highest")
    return reference.rotate(out.reshape(b, sq, hq, d))
