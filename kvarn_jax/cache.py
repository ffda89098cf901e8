"""The paged KVarN cache of one attention layer as a pytree, with pure update functions.

* `pages`: uint8 [num_blocks, num_kv_heads, record_bytes], one record per (block, head);
* `pool_k`, `pool_v`: [pool_slots, G, num_kv_heads, D] in the model dtype, rotated: the
  tail pool holding every block that is still being written (and the sink blocks);
* `block_to_slot`: int32 [num_blocks], -1 where the block lives in `pages`;
* `slot_to_block`: int32 [pool_slots], -1 for a free slot;
* `dropped_tokens`: int32 [], tokens whose block found no free slot (pool too small).

Lifecycle, keyed by physical block id (so prefix sharing and block recycling stay right):
`append` rotates new tokens into pool slots (a block gets a slot on its first write);
`commit` quantizes every full block whose tokens were all accepted before this step
(`seq_len - query_len`), except the first `sink_blocks` blocks of each sequence, and frees
its slot; `release` does the same for finished sequences, sinks included, and drops
partial blocks; `write_blocks` quantizes whole blocks straight from new tokens (a prompt's
blocks that one step fills), the bytes `append` and `commit` would give, with no pool
slot. Jit them with the cache donated (`jax.jit(..., donate_argnums=0)`), and
XLA updates the buffers in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvarn import oracle
from kvarn.format import DEFAULT_PRESET, layout
from kvarn_jax import codec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVarNCache:
    pages: jax.Array
    pool_k: jax.Array
    pool_v: jax.Array
    block_to_slot: jax.Array
    slot_to_block: jax.Array
    dropped_tokens: jax.Array
    preset: str = dataclasses.field(metadata=dict(static=True))
    sink_blocks: int = dataclasses.field(metadata=dict(static=True))
    iters: int = dataclasses.field(metadata=dict(static=True))

    @property
    def tile(self) -> int:
        return self.pool_k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.pool_k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.pool_k.shape[3]

    @property
    def num_blocks(self) -> int:
        return self.pages.shape[0]

    @property
    def pool_slots(self) -> int:
        return self.pool_k.shape[0]


def init(num_blocks: int, num_kv_heads: int, head_dim: int, *, pool_slots: int,
         dtype=jnp.float16, preset: str = DEFAULT_PRESET, sink_blocks: int = 1,
         iters: int = oracle.DEFAULT_ITERS) -> KVarNCache:
    """An empty cache. Size `pool_slots` as 2 per running sequence (sink + tail) plus the
    blocks one prefill step writes through the pool (prompt tokens per step / tile; none
    of those that `write_blocks` writes)."""
    lay = layout(preset, head_dim)
    if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16):
        raise TypeError(f"the cache holds the model dtype, float16 or bfloat16; got {dtype}")
    if pool_slots < 1 or num_blocks < 1:
        raise ValueError(f"need num_blocks >= 1 and pool_slots >= 1; got {num_blocks}, {pool_slots}")
    g = lay.preset.tile
    return KVarNCache(
        pages=jnp.zeros((num_blocks, num_kv_heads, lay.record_bytes), jnp.uint8),
        pool_k=jnp.zeros((pool_slots, g, num_kv_heads, head_dim), dtype),
        pool_v=jnp.zeros((pool_slots, g, num_kv_heads, head_dim), dtype),
        block_to_slot=jnp.full((num_blocks,), -1, jnp.int32),
        slot_to_block=jnp.full((pool_slots,), -1, jnp.int32),
        dropped_tokens=jnp.zeros((), jnp.int32),
        preset=lay.preset.name, sink_blocks=sink_blocks, iters=iters,
    )


def _check_tables(block_tables: jax.Array, *lens: jax.Array) -> None:
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [B, M]; got shape {block_tables.shape}")
    b = block_tables.shape[0]
    for x in lens:
        if x.shape != (b,):
            raise ValueError(f"seq_lens / query_lens must be [B={b}]; got {x.shape}")
    for x in (block_tables, *lens):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"block tables and lengths must be integer arrays; got {x.dtype}")


def append(cache: KVarNCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
           *, impl: str = "auto") -> KVarNCache:
    """Write new tokens: k, v [T, num_kv_heads, D] (post-RoPE, model dtype) at cache
    positions `slot_mapping` [T] = block * G + offset (-1 = padding, skipped).

    Tokens of one block must be contiguous in the batch (as a scheduler lays them out).
    A block gets a slot only when its writes start at offset 0: a write into the middle of
    a block without a slot is a recomputed token of a block already quantized (a prefix
    hit that covers the whole prompt makes the scheduler recompute its last token), and
    the record keeps it.
    """
    t = k.shape[0]
    if k.shape != v.shape or k.shape[1:] != (cache.num_kv_heads, cache.head_dim):
        raise ValueError(f"k and v must be [T, {cache.num_kv_heads}, {cache.head_dim}]; "
                         f"got {k.shape} and {v.shape}")
    if slot_mapping.shape != (t,) or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be [T={t}] integers; got {slot_mapping.shape} "
                         f"{slot_mapping.dtype}")
    if k.dtype != cache.pool_k.dtype or v.dtype != cache.pool_k.dtype:
        raise TypeError(f"k and v must be {cache.pool_k.dtype}, the pool's dtype (the model's); "
                        f"got {k.dtype} and {v.dtype}")
    g = cache.tile
    valid = slot_mapping >= 0
    block = jnp.where(valid, slot_mapping // g, 0)
    offset = slot_mapping % g

    # A block's first write this step takes the next free slot.
    first = valid & jnp.concatenate([jnp.ones((1,), bool), block[1:] != block[:-1]])
    needs = first & (cache.block_to_slot[block] < 0) & (offset == 0)
    run_start = jax.lax.cummax(jnp.where(first, jnp.arange(t), 0))
    opens = offset[run_start] == 0  # this run of the block starts the block
    rank = jnp.cumsum(needs) - 1
    free = jnp.nonzero(cache.slot_to_block < 0, size=t, fill_value=-1)[0]
    new_slot = jnp.where(needs, free[jnp.clip(rank, 0, t - 1)], -1)
    granted = needs & (new_slot >= 0)
    block_to_slot = cache.block_to_slot.at[jnp.where(granted, block, cache.num_blocks)].set(
        new_slot, mode="drop")
    slot_to_block = cache.slot_to_block.at[jnp.where(granted, new_slot, cache.pool_slots)].set(
        block, mode="drop")

    slot = jnp.where(valid, block_to_slot[block], -1)
    target = jnp.where(slot >= 0, slot, cache.pool_slots)  # out of range: dropped
    k_rot = codec.rotate(k, impl=impl)
    v_rot = codec.rotate(v, impl=impl)
    return dataclasses.replace(
        cache,
        pool_k=cache.pool_k.at[target, offset].set(k_rot, mode="drop"),
        pool_v=cache.pool_v.at[target, offset].set(v_rot, mode="drop"),
        block_to_slot=block_to_slot, slot_to_block=slot_to_block,
        dropped_tokens=cache.dropped_tokens
        + jnp.sum(valid & (slot < 0) & opens).astype(jnp.int32),
    )


def write_blocks(cache: KVarNCache, k: jax.Array, v: jax.Array, token_starts: jax.Array,
                 blocks: jax.Array, *, impl: str = "auto") -> KVarNCache:
    """Quantize whole blocks straight from new tokens into their records, with no pool
    slot: block `blocks[i]` holds the G tokens k, v [token_starts[i] : token_starts[i] + G]
    of k, v [T, num_kv_heads, D] (the pool's dtype). The bytes of `append` then `commit`
    (the pool holds exactly `codec.rotate` of the tokens): for blocks whose tokens all
    arrive in one step and are accepted, a prompt's, which then need no slot. The caller
    keeps them out of `append` (padding in its slot mapping)."""
    if k.shape != v.shape or k.shape[1:] != (cache.num_kv_heads, cache.head_dim):
        raise ValueError(f"k and v must be [T, {cache.num_kv_heads}, {cache.head_dim}]; "
                         f"got {k.shape} and {v.shape}")
    if k.dtype != cache.pool_k.dtype or v.dtype != cache.pool_k.dtype:
        raise TypeError(f"k and v must be {cache.pool_k.dtype}, the pool's dtype (the model's); "
                        f"got {k.dtype} and {v.dtype}")
    if (token_starts.ndim != 1 or blocks.shape != token_starts.shape
            or not all(jnp.issubdtype(x.dtype, jnp.integer) for x in (token_starts, blocks))):
        raise ValueError(f"token_starts and blocks must be 1-D integer arrays of one length; "
                         f"got {token_starts.dtype} {token_starts.shape} and {blocks.dtype} "
                         f"{blocks.shape}")
    n = blocks.shape[0]
    if n == 0:
        return cache
    hk, g, d = cache.num_kv_heads, cache.tile, cache.head_dim
    rows = token_starts[:, None] + jnp.arange(g)

    def tiles(x):  # [n, G, Hk, D] -> [n * Hk, G, D], as the pool holds them
        return jnp.swapaxes(codec.rotate(x[rows], impl=impl), 1, 2).reshape(n * hk, g, d)

    records = codec.quantize(tiles(k), tiles(v), cache.preset, cache.iters,
                             impl=impl).reshape(n, hk, -1)
    return dataclasses.replace(cache, pages=cache.pages.at[blocks].set(records))


def _quantize_slots(cache: KVarNCache, slots: jax.Array, blocks: jax.Array,
                    impl: str) -> jax.Array:
    """The pages with the records of pool slots `slots` [n] written at `blocks` [n]
    (negative: not written)."""
    n = slots.shape[0]
    hk, g, d = cache.num_kv_heads, cache.tile, cache.head_dim
    take = jnp.maximum(slots, 0)

    def tiles(pool):  # [n, G, Hk, D] -> [n * Hk, G, D]
        return jnp.swapaxes(pool[take], 1, 2).reshape(n * hk, g, d)

    records = codec.quantize(tiles(cache.pool_k), tiles(cache.pool_v), cache.preset,
                             cache.iters, impl=impl).reshape(n, hk, -1)
    return cache.pages.at[jnp.where(blocks >= 0, blocks, cache.num_blocks)].set(
        records, mode="drop")


def _flush(cache: KVarNCache, quantize_blocks: jax.Array, free_blocks: jax.Array,
           max_tiles: int, impl: str) -> KVarNCache:
    """Quantize the pool slots of blocks marked in `quantize_blocks` [num_blocks] (at most
    `max_tiles` of them), then free the slots of those and of `free_blocks`."""
    holder = cache.slot_to_block
    held = holder >= 0
    safe = jnp.where(held, holder, 0)
    chosen = held & quantize_blocks[safe]
    slots = jnp.nonzero(chosen, size=max_tiles, fill_value=-1)[0]
    blocks = jnp.where(slots >= 0, holder[jnp.maximum(slots, 0)], -1)
    pages = _quantize_slots(cache, slots, blocks, impl)

    # Chosen slots beyond max_tiles stay held and are quantized by the next call.
    quantized = jnp.zeros_like(held).at[jnp.where(slots >= 0, slots, cache.pool_slots)].set(
        True, mode="drop")
    release = quantized | (held & free_blocks[safe] & ~chosen)
    gone = jnp.where(release, holder, cache.num_blocks)
    return dataclasses.replace(
        cache, pages=pages,
        block_to_slot=cache.block_to_slot.at[gone].set(-1, mode="drop"),
        slot_to_block=jnp.where(release, -1, holder),
    )


def snapshot(cache: KVarNCache, blocks: jax.Array, *, impl: str = "auto") -> KVarNCache:
    """Write the records of the pool blocks `blocks` [n] (physical ids; negative ids and
    blocks without a slot are skipped) and keep their slots: chunk-invariant attention
    (`pallas_attention.attention(..., chunk_invariant=True)`) reads a block from its
    record for the rows past it, also in the step that filled it, while the block's own
    rows read it from the pool. Committing the block later writes the same bytes again."""
    if blocks.ndim != 1 or not jnp.issubdtype(blocks.dtype, jnp.integer):
        raise ValueError(f"blocks must be a 1-D integer array of block ids; got "
                         f"{blocks.dtype} {blocks.shape}")
    if blocks.shape[0] == 0:
        return cache
    slot = jnp.where(blocks >= 0, cache.block_to_slot[jnp.maximum(blocks, 0)], -1)
    return dataclasses.replace(cache, pages=_quantize_slots(
        cache, slot, jnp.where(slot >= 0, blocks, -1), impl))


def _mark(num_blocks: int, block_tables: jax.Array, mask: jax.Array) -> jax.Array:
    """[num_blocks] bool: physical blocks referenced where `mask` [B, M] holds."""
    ids = jnp.where(mask & (block_tables >= 0), block_tables, num_blocks)
    return jnp.zeros((num_blocks,), bool).at[ids].set(True, mode="drop")


def commit(cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
           query_lens: jax.Array, *, max_tiles: int | None = None,
           impl: str = "auto") -> KVarNCache:
    """Quantize every full block of each sequence whose tokens were all accepted before
    this step (`seq_lens - query_lens`), except the sink blocks; free their slots.

    block_tables [B, M] int32 (physical block of each sequence's j-th block, -1 unused),
    seq_lens / query_lens [B]. At most `max_tiles` blocks (default: the pool size) are
    quantized per call; the rest wait for the next one.
    """
    _check_tables(block_tables, seq_lens, query_lens)
    j = jnp.arange(block_tables.shape[1])
    committed = (seq_lens - query_lens)[:, None]
    full = (j[None, :] + 1) * cache.tile <= committed
    ready = _mark(cache.num_blocks, block_tables, full & (j[None, :] >= cache.sink_blocks))
    nothing = jnp.zeros((cache.num_blocks,), bool)
    return _flush(cache, ready, nothing, max_tiles or cache.pool_slots, impl)


def release(cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
            *, max_tiles: int | None = None, impl: str = "auto") -> KVarNCache:
    """Finished sequences: quantize their full blocks (sinks too), drop partial ones."""
    _check_tables(block_tables, seq_lens)
    j = jnp.arange(block_tables.shape[1])[None, :]
    full = (j + 1) * cache.tile <= seq_lens[:, None]
    partial = ~full & (j * cache.tile < seq_lens[:, None])
    ready = _mark(cache.num_blocks, block_tables, full)
    dropped = _mark(cache.num_blocks, block_tables, partial)
    return _flush(cache, ready, dropped, max_tiles or cache.pool_slots, impl)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def gather_kv(cache: KVarNCache, block_tables: jax.Array, max_blocks: int,
              records_from: int | None = None, records_to: int | None = None):
    """K, V [B, max_blocks * G, Hk, D] float32 (rotated frame) of each sequence's blocks,
    read from the pool or dequantized from the pages: the exact view attention sees.
    records_from: blocks from this index of each table on, up to `records_to` (default:
    the end), are dequantized from their records even while in the pool (chunk-invariant
    reads of the rows past them)."""
    _check_tables(block_tables)
    bt = block_tables[:, :max_blocks]
    b, m = bt.shape
    hk, g, d = cache.num_kv_heads, cache.tile, cache.head_dim
    blk = jnp.maximum(bt, 0)
    slot = cache.block_to_slot[blk]
    recs = cache.pages[blk].reshape(b * m * hk, -1)
    k_q, v_q = codec.dequantize(recs, cache.preset, d)  # [B*M*Hk, G, D]

    def arrange(x):  # -> [B, M, G, Hk, D]
        return jnp.swapaxes(x.reshape(b, m, hk, g, d), 2, 3)

    in_pool = slot >= 0
    if records_from is not None:
        j = jnp.arange(m)[None, :]
        in_pool &= (j < records_from) | (j >= (m if records_to is None else records_to))
    in_pool = in_pool[:, :, None, None, None]
    take = jnp.maximum(slot, 0)
    k = jnp.where(in_pool, cache.pool_k[take].astype(jnp.float32), arrange(k_q))
    v = jnp.where(in_pool, cache.pool_v[take].astype(jnp.float32), arrange(v_q))
    return k.reshape(b, m * g, hk, d), v.reshape(b, m * g, hk, d)
