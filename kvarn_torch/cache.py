"""The paged KVarN cache of one attention layer, in torch: tensors updated in place.

The torch mirror of `kvarn_jax.cache` (the semantic spec): the same fields, the same slot
allocation order and lifecycle, and byte-identical records for the same inputs.

* `pages`: uint8 [num_blocks, num_kv_heads, record_bytes], one record per (block, head);
* `pool_k`, `pool_v`: [pool_slots, G, num_kv_heads, D] in the model dtype, rotated: the
  tail pool holding every block that is still being written (and the sink blocks);
* `block_to_slot`: int32 [num_blocks], -1 where the block lives in `pages`;
* `slot_to_block`: int32 [pool_slots], -1 for a free slot;
* `dropped_tokens`: int32 [] tensor, tokens whose block found no free slot (pool too
  small); a device counter, so that counting costs no host sync (`int(...)` reads it).

Lifecycle, keyed by physical block id (so prefix sharing and block recycling stay right):
`append` rotates new tokens into pool slots (a block gets a slot on its first write: the
lowest-numbered free slot, blocks served in order of first appearance); `commit`
quantizes every full block whose tokens were all accepted before this step
(`seq_len - query_len`), except the first `sink_blocks` blocks of each sequence, and frees
its slot; `release` does the same for finished sequences, sinks included, and drops
partial blocks. `commit` and `release` also take the caches of several layers that share
one pair of slot tables (vLLM's layers share block ids): the slot bookkeeping runs once
and one codec call quantizes the tiles of every layer (on the GPU, one `triton_tiles`
launch gathers them and one writes the records back); `allocate` (slot tables only) and
`write` (one layer's pool) are the two halves of `append` for the same reason.
`write_blocks` quantizes whole blocks straight from new tokens (a prompt's blocks that
one step fills), the bytes `append` and `commit` would give, with no pool slot.

Every function works with vectorized index math and no Python loop over tokens or
blocks. `append` and `gather_kv` never synchronize with the host; `commit` and `release`
read one count (how many tiles to quantize) unless `max_tiles` is given, in which case
they quantize exactly `max_tiles` tiles (padding included) with no host sync, as the JAX
version does, which suits CUDA graphs when the caller bounds the tiles per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from kvarn.format import DEFAULT_PRESET, layout
from kvarn_torch import codec, triton_tiles, triton_write

INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class KVarNCache:
    pages: Tensor
    pool_k: Tensor
    pool_v: Tensor
    block_to_slot: Tensor
    slot_to_block: Tensor
    dropped_tokens: Tensor
    preset: str = DEFAULT_PRESET
    sink_blocks: int = 1
    iters: int = codec.DEFAULT_ITERS

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

    @property
    def dtype(self) -> torch.dtype:
        return self.pool_k.dtype

    @property
    def device(self) -> torch.device:
        return self.pages.device


def init(num_blocks: int, num_kv_heads: int, head_dim: int, *, pool_slots: int,
         dtype: torch.dtype = torch.float16, preset: str = DEFAULT_PRESET,
         sink_blocks: int = 1, iters: int = codec.DEFAULT_ITERS,
         device: torch.device | str | None = None) -> KVarNCache:
    """An empty cache. Size `pool_slots` as 2 per running sequence (sink + tail) plus the
    blocks one prefill step writes through the pool (prompt tokens per step / tile; none
    of those that `write_blocks` writes)."""
    lay = layout(preset, head_dim)
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the cache holds the model dtype, float16 or bfloat16; got {dtype}")
    if pool_slots < 1 or num_blocks < 1:
        raise ValueError(f"need num_blocks >= 1 and pool_slots >= 1; got {num_blocks}, "
                         f"{pool_slots}")
    if num_kv_heads < 1:
        raise ValueError(f"need num_kv_heads >= 1; got {num_kv_heads}")
    g = lay.preset.tile
    return KVarNCache(
        pages=torch.zeros((num_blocks, num_kv_heads, lay.record_bytes), dtype=torch.uint8,
                          device=device),
        pool_k=torch.zeros((pool_slots, g, num_kv_heads, head_dim), dtype=dtype, device=device),
        pool_v=torch.zeros((pool_slots, g, num_kv_heads, head_dim), dtype=dtype, device=device),
        block_to_slot=torch.full((num_blocks,), -1, dtype=torch.int32, device=device),
        slot_to_block=torch.full((pool_slots,), -1, dtype=torch.int32, device=device),
        dropped_tokens=torch.zeros((), dtype=torch.int32, device=device),
        preset=lay.preset.name, sink_blocks=sink_blocks, iters=iters,
    )


# ---------------------------------------------------------------- index helpers


def nth_true(mask: Tensor, n: int) -> Tensor:
    """[n] int64: the indices of the first n True entries of `mask` [S], in order, and S
    where there are fewer (`jnp.nonzero(mask, size=n)` without a host sync)."""
    cum = torch.cumsum(mask.to(torch.int32), 0, dtype=torch.int32)
    want = torch.arange(1, n + 1, dtype=torch.int32, device=mask.device)
    return torch.searchsorted(cum, want)


def _scatter_(dst: Tensor, index: tuple[Tensor, ...], values: Tensor, keep: Tensor) -> None:
    """dst[index][i] = values[i] where keep[i], in place, without a host sync.

    Entries not kept repeat the write of the first kept entry (same place, same value, so
    the order of duplicate writes cannot matter); when nothing is kept they all rewrite
    dst at index 0 with its own value.
    """
    if keep.numel() == 0:
        return
    # (0-dim tensor indices would sync with the host, so gather through index_select;
    # the function runs inside CUDA graphs)
    first = torch.argmax(keep.to(torch.int32)).reshape(1)  # first kept entry (0 if none)
    anything = keep.any()
    shape = (-1,) + (1,) * (values.dim() - 1)
    fallback_index = [torch.where(anything, i.index_select(0, first)[0], 0) for i in index]
    fallback_value = torch.where(anything, values.index_select(0, first)[0],
                                 dst[(0,) * len(index)])
    index = tuple(torch.where(keep, i, f) for i, f in zip(index, fallback_index))
    values = torch.where(keep.reshape(shape), values, fallback_value)
    dst.index_put_(index, values)


def _mark(num_blocks: int, block_tables: Tensor, mask: Tensor) -> Tensor:
    """[num_blocks] bool: physical blocks referenced where `mask` [B, M] holds."""
    ids = torch.where(mask & (block_tables >= 0), block_tables, num_blocks).long()
    marks = torch.zeros(num_blocks + 1, dtype=torch.bool, device=block_tables.device)
    # index_fill_ takes the value as a kernel argument; `marks[ids] = True` would copy a
    # host scalar to the GPU and wait for the stream (a host sync per step in vLLM).
    marks.index_fill_(0, ids.flatten(), True)  # duplicates are harmless: all write True
    return marks[:num_blocks]


def _check_tables(cache: KVarNCache, block_tables: Tensor, *lens: Tensor) -> None:
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [B, M]; got shape {tuple(block_tables.shape)}")
    b = block_tables.shape[0]
    for x in lens:
        if tuple(x.shape) != (b,):
            raise ValueError(f"seq_lens / query_lens must be [B={b}]; got {tuple(x.shape)}")
    for x in (block_tables, *lens):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"block tables and lengths must be integer tensors; got {x.dtype}")
        if x.device != cache.device:
            raise ValueError(f"index tensors must be on the cache's device {cache.device}; "
                             f"got {x.device}")


# ---------------------------------------------------------------- cache operations


def _check_tokens(cache: KVarNCache, k: Tensor, v: Tensor, *index: Tensor) -> int:
    """T, once k, v [T, num_kv_heads, D] and the index tensors are checked."""
    t = k.shape[0] if k.dim() else 0
    if k.shape != v.shape or tuple(k.shape[1:]) != (cache.num_kv_heads, cache.head_dim):
        raise ValueError(f"k and v must be [T, {cache.num_kv_heads}, {cache.head_dim}]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if any(x.device != cache.device for x in (k, v, *index)):
        raise ValueError(f"k, v and their index tensors must be on the cache's device "
                         f"{cache.device}")
    if k.dtype != cache.dtype or v.dtype != cache.dtype:
        raise TypeError(f"k and v must be {cache.dtype}, the pool's dtype (the model's); got "
                        f"{k.dtype} and {v.dtype}")
    if any(x.dtype.is_floating_point or x.dtype == torch.bool for x in index):
        raise TypeError(f"index tensors must be integers; got {[x.dtype for x in index]}")
    return t


def _check_writes(cache: KVarNCache, k: Tensor, v: Tensor, slot_mapping: Tensor) -> int:
    t = _check_tokens(cache, k, v, slot_mapping)
    if tuple(slot_mapping.shape) != (t,):
        raise ValueError(f"slot_mapping must be [T={t}]; got {tuple(slot_mapping.shape)}")
    return t


def allocate(cache: KVarNCache, slot_mapping: Tensor) -> KVarNCache:
    """Give every block that `slot_mapping` [T] writes a pool slot if it has none: a
    block's first write takes the lowest-numbered free slot, blocks served in order of
    first appearance. Touches only the slot tables, so layers that share them (one vLLM
    KV-cache group) allocate once per step.

    A block gets a slot only when its writes start at offset 0: a write into the middle of
    a block without a slot is a recomputed token of a block already quantized (a prefix
    hit covering a whole prompt makes vLLM recompute its last token); the record keeps it.
    """
    if slot_mapping.numel() == 0:
        return cache
    g, s = cache.tile, cache.pool_slots
    b2s, s2b = cache.block_to_slot, cache.slot_to_block
    sm = slot_mapping.long()
    valid = sm >= 0
    block = torch.where(valid, sm // g, 0)
    first = valid.clone()
    first[1:] &= block[1:] != block[:-1]
    needs = first & (b2s[block] < 0) & (torch.remainder(sm, g) == 0)
    rank = torch.cumsum(needs.to(torch.int32), 0, dtype=torch.int32) - 1
    free_cum = torch.cumsum((s2b < 0).to(torch.int32), 0, dtype=torch.int32)
    new_slot = torch.searchsorted(free_cum, rank + 1)  # the (rank+1)-th free slot, or S
    granted = needs & (new_slot < s)
    # Scatter with max: a granted slot replaces -1; every other write is -1, a no-op.
    minus_one = torch.full_like(block, -1, dtype=torch.int32)
    b2s.scatter_reduce_(0, block, torch.where(granted, new_slot.to(torch.int32), minus_one),
                        reduce="amax")
    s2b.scatter_reduce_(0, torch.where(granted, new_slot, 0),
                        torch.where(granted, block.to(torch.int32), minus_one), reduce="amax")
    return cache


def write(cache: KVarNCache, k: Tensor, v: Tensor, slot_mapping: Tensor,
          *, impl: codec.Impl = "auto") -> KVarNCache:
    """Rotate k, v [T, num_kv_heads, D] (the pool's dtype) into the pool slots `allocate`
    gave their blocks; tokens whose block has no slot are counted in `dropped_tokens`. No
    host sync. The Triton kernel (`triton_write`, one launch) where `impl` picks Triton;
    the torch ops below are its reference, with the same bytes."""
    t = _check_writes(cache, k, v, slot_mapping)
    if t == 0:
        return cache
    if codec.use_triton(impl, k, triton_write._write_kernel):
        triton_write.write(k, v, slot_mapping, cache.block_to_slot, cache.pool_k,
                           cache.pool_v, cache.dropped_tokens)
        return cache
    g = cache.tile
    sm = slot_mapping.long()
    valid = sm >= 0
    block = torch.where(valid, sm // g, 0)
    slot = torch.where(valid, cache.block_to_slot[block].long(), -1)
    written = slot >= 0
    offset = torch.remainder(sm, g)
    first = valid.clone()
    first[1:] &= block[1:] != block[:-1]
    idx = torch.arange(t, device=sm.device)
    run_start = torch.cummax(torch.where(first, idx, 0), 0).values
    opens = offset[run_start] == 0  # lost only if this run starts the block (see allocate)
    target = (slot.clamp(min=0), offset)
    _scatter_(cache.pool_k, target, codec.rotate(k, impl=impl), written)
    _scatter_(cache.pool_v, target, codec.rotate(v, impl=impl), written)
    cache.dropped_tokens += (valid & ~written & opens).sum().to(torch.int32)
    return cache


def append(cache: KVarNCache, k: Tensor, v: Tensor, slot_mapping: Tensor,
           *, impl: codec.Impl = "auto") -> KVarNCache:
    """Write new tokens: k, v [T, num_kv_heads, D] (post-RoPE, model dtype) at cache
    positions `slot_mapping` [T] = block * G + offset (-1 = padding, skipped):
    `allocate` then `write`.

    Tokens of one block must be contiguous in the batch (as a scheduler lays them out).
    Updates the cache in place (and returns it).
    """
    _check_writes(cache, k, v, slot_mapping)
    return write(allocate(cache, slot_mapping), k, v, slot_mapping, impl=impl)


def write_blocks(cache: KVarNCache, k: Tensor, v: Tensor, token_starts: Tensor,
                 blocks: Tensor, *, impl: codec.Impl = "auto") -> KVarNCache:
    """Quantize whole blocks straight from new tokens into their records, with no pool
    slot: block `blocks[i]` holds the G tokens k, v [token_starts[i] : token_starts[i] + G]
    of k, v [T, num_kv_heads, D] (the pool's dtype). The bytes of `append` then `commit`
    (the pool holds exactly `codec.rotate` of the tokens): for blocks whose tokens all
    arrive in one step and are accepted, a prompt's, which then need no slot. The caller
    keeps them out of `append` (padding in its slot mapping). No host sync."""
    _check_tokens(cache, k, v, token_starts, blocks)
    if token_starts.dim() != 1 or blocks.shape != token_starts.shape:
        raise ValueError(f"token_starts and blocks must be 1-D and of one length; got "
                         f"{list(token_starts.shape)} and {list(blocks.shape)}")
    n = blocks.shape[0]
    if n == 0:
        return cache
    g, hk, d = cache.tile, cache.num_kv_heads, cache.head_dim
    rows = token_starts.long()[:, None] + torch.arange(g, device=k.device)

    def tiles(x: Tensor) -> Tensor:  # [n, G, Hk, D] -> [n * Hk, G, D], as the pool holds them
        return codec.rotate(x[rows], impl=impl).transpose(1, 2).reshape(n * hk, g, d)

    records = codec.quantize(tiles(k), tiles(v), cache.preset, cache.iters, impl=impl)
    cache.pages.index_copy_(0, blocks.long(), records.view(n, hk, -1))
    return cache


Layers = KVarNCache | Sequence[KVarNCache]


def _as_layers(caches: Layers) -> list[KVarNCache]:
    """One cache, or the caches of several layers sharing one pair of slot tables (the
    same tensors), as vLLM's layers share block ids."""
    layers = [caches] if isinstance(caches, KVarNCache) else list(caches)
    if not layers:
        raise ValueError("need at least one cache")
    head = layers[0]
    for c in layers[1:]:
        if c.block_to_slot is not head.block_to_slot or c.slot_to_block is not head.slot_to_block:
            raise ValueError("caches flushed together must share block_to_slot and "
                             "slot_to_block (the same tensors)")
        if (c.tile, c.preset, c.iters) != (head.tile, head.preset, head.iters):
            raise ValueError("caches flushed together must have the same preset, tile and "
                             "iters")
    return layers


def flush(caches: Layers, quantize_blocks: Tensor, free_blocks: Tensor,
          max_tiles: int | None = None, *, backlog: Tensor | None = None,
          impl: codec.Impl = "auto") -> Layers:
    """Quantize the pool slots of the blocks marked in `quantize_blocks` [num_blocks] bool
    in every layer, write their records, free their slots and those of `free_blocks`.

    With `max_tiles` only the first that many marked slots (in slot order) are quantized
    and the call never syncs with the host (0: only free); the marked slots left over
    stay held and, when `backlog` (int32 [] device counter) is given, are added to it.
    Without it, the one host sync reads how many slots are marked.
    """
    layers = _as_layers(caches)
    head = layers[0]
    holder = head.slot_to_block
    held = holder >= 0
    safe = holder.clamp(min=0).long()
    chosen = held & quantize_blocks[safe]
    if max_tiles is None:
        n = int(chosen.sum())  # the one host sync: quantize exactly the tiles that are ready
    else:
        n = int(max_tiles)
        if n < 0:
            raise ValueError(f"max_tiles must be >= 0; got {max_tiles}")

    rank = torch.cumsum(chosen.to(torch.int32), 0, dtype=torch.int32) - 1
    quantized = chosen & (rank < n)
    if backlog is not None:
        backlog += (chosen & ~quantized).sum().to(torch.int32)
    if n:
        slots = nth_true(chosen, n)
        ok = slots < head.pool_slots
        take = torch.where(ok, slots, 0)
        blocks = holder[take].long()
        _quantize_slots(layers, take, torch.where(ok, blocks, -1), impl)

    release = quantized | (held & free_blocks[safe] & ~chosen)
    head.block_to_slot.scatter_reduce_(
        0, torch.where(release, safe, 0),
        torch.where(release, -1, INT32_MAX).to(torch.int32), reduce="amin")
    holder.masked_fill_(release, -1)
    return caches


def _quantize_slots(layers: list[KVarNCache], slots: Tensor, blocks: Tensor,
                    impl: codec.Impl) -> None:
    """Quantize pool slots `slots` [n] of every layer (one codec call) and write each
    layer's records into its pages at `blocks` [n] (negative: not written)."""
    head = layers[0]
    pools_k, pools_v = [c.pool_k for c in layers], [c.pool_v for c in layers]
    pages = [c.pages for c in layers]
    if (codec.use_triton(impl, head.pool_k, triton_tiles._copy_kernel)
            and triton_tiles.uniform(pools_k + pools_v) and triton_tiles.uniform(pages)):
        # one launch each way for all layers, where the torch ops below launch ~10 a layer
        k = triton_tiles.gather_tiles(pools_k, slots)
        v = triton_tiles.gather_tiles(pools_v, slots)
        records = codec.quantize(k, v, head.preset, head.iters, impl=impl)
        triton_tiles.scatter_records(records, pages, blocks)
        return
    n = slots.shape[0]

    def tiles(pool: Tensor) -> Tensor:  # [n, G, Hk, D] -> [n * Hk, G, D]
        _, g, hk, d = pool.shape
        return pool[slots].transpose(1, 2).reshape(n * hk, g, d)

    # one codec call for all layers when they agree in shape
    same = all(c.pool_k.shape == head.pool_k.shape for c in layers)
    for group in [layers] if same else [[c] for c in layers]:
        k = torch.cat([tiles(c.pool_k) for c in group])
        v = torch.cat([tiles(c.pool_v) for c in group])
        records = codec.quantize(k, v, head.preset, head.iters, impl=impl)
        for c, rec in zip(group, records.chunk(len(group))):
            _scatter_(c.pages, (blocks.clamp(min=0),), rec.reshape(n, c.num_kv_heads, -1),
                      blocks >= 0)


def snapshot(caches: Layers, blocks: Tensor, *, impl: codec.Impl = "auto") -> Layers:
    """Write the records of the pool blocks `blocks` [n] (physical ids; negative ids and
    blocks without a slot are skipped) and keep their slots: chunk-invariant attention
    (`triton_attention.attention(..., chunk_invariant=True)`) reads a block from its record
    for the rows past it, also in the step that filled it, while the block's own rows read
    it from the pool. Committing the block later writes the same bytes again. No host
    sync."""
    layers = _as_layers(caches)
    head = layers[0]
    if blocks.dim() != 1 or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"blocks must be a 1-D integer tensor of block ids; got "
                         f"{blocks.dtype} {list(blocks.shape)}")
    if blocks.numel() == 0:
        return caches
    ids = blocks.long()
    slot = torch.where(ids >= 0, head.block_to_slot[ids.clamp(min=0)].long(), -1)
    held = slot >= 0
    _quantize_slots(layers, slot.clamp(min=0), torch.where(held, ids, -1), impl)
    return caches


def commit_marks(cache: KVarNCache, block_tables: Tensor, seq_lens: Tensor,
                 query_lens: Tensor) -> Tensor:
    """[num_blocks] bool: the full blocks of each sequence whose tokens were all accepted
    before this step (`seq_lens - query_lens`), sink blocks excluded."""
    _check_tables(cache, block_tables, seq_lens, query_lens)
    j = torch.arange(block_tables.shape[1], device=block_tables.device)
    committed = (seq_lens.long() - query_lens.long())[:, None]
    full = (j[None, :] + 1) * cache.tile <= committed
    return _mark(cache.num_blocks, block_tables, full & (j[None, :] >= cache.sink_blocks))


def release_marks(cache: KVarNCache, block_tables: Tensor,
                  seq_lens: Tensor) -> tuple[Tensor, Tensor]:
    """([num_blocks] bool full blocks, sinks included; [num_blocks] bool partial blocks) of
    finished sequences."""
    _check_tables(cache, block_tables, seq_lens)
    j = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :]
    lens = seq_lens.long()[:, None]
    full = (j + 1) * cache.tile <= lens
    partial = ~full & (j * cache.tile < lens)
    return (_mark(cache.num_blocks, block_tables, full),
            _mark(cache.num_blocks, block_tables, partial))


def commit(cache: Layers, block_tables: Tensor, seq_lens: Tensor, query_lens: Tensor,
           *, max_tiles: int | None = None, impl: codec.Impl = "auto") -> Layers:
    """Quantize every full block of each sequence whose tokens were all accepted before
    this step (`seq_lens - query_lens`), except the sink blocks; free their slots.

    block_tables [B, M] int (physical block of each sequence's j-th block, -1 unused),
    seq_lens / query_lens [B]. With `max_tiles`, at most that many blocks are quantized
    per call (the rest wait for the next one) and the call never syncs with the host.
    """
    ready = commit_marks(_as_layers(cache)[0], block_tables, seq_lens, query_lens)
    return flush(cache, ready, torch.zeros_like(ready), max_tiles, impl=impl)


def release(cache: Layers, block_tables: Tensor, seq_lens: Tensor,
            *, max_tiles: int | None = None, impl: codec.Impl = "auto") -> Layers:
    """Finished sequences: quantize their full blocks (sinks too), drop partial ones."""
    ready, dropped = release_marks(_as_layers(cache)[0], block_tables, seq_lens)
    return flush(cache, ready, dropped, max_tiles, impl=impl)


def gather_kv(cache: KVarNCache, block_tables: Tensor, max_blocks: int | None = None,
              records_from: int | None = None,
              records_to: int | None = None) -> tuple[Tensor, Tensor]:
    """K, V [B, max_blocks * G, Hk, D] float32 (rotated frame) of each sequence's blocks,
    read from the pool or dequantized from the pages: the exact view attention sees.
    records_from: blocks from this index of each table on, up to `records_to` (default:
    the end), are dequantized from their records even while in the pool (chunk-invariant
    reads of the rows past them)."""
    _check_tables(cache, block_tables)
    bt = block_tables[:, : (max_blocks or block_tables.shape[1])].long()
    b, m = bt.shape
    hk, g, d = cache.num_kv_heads, cache.tile, cache.head_dim
    blk = bt.clamp(min=0)
    slot = cache.block_to_slot[blk].long()
    recs = cache.pages[blk].reshape(b * m * hk, -1)
    k_q, v_q = codec.dequantize(recs, cache.preset, d, impl="reference")  # [B*M*Hk, G, D]

    def arrange(x: Tensor) -> Tensor:  # -> [B, M, G, Hk, D]
        return x.reshape(b, m, hk, g, d).transpose(2, 3)

    in_pool = slot >= 0
    if records_from is not None:
        j = torch.arange(m, device=bt.device)[None, :]
        in_pool &= (j < records_from) | (j >= (m if records_to is None else records_to))
    in_pool = in_pool[:, :, None, None, None]
    take = slot.clamp(min=0)
    k = torch.where(in_pool, cache.pool_k[take].float(), arrange(k_q))
    v = torch.where(in_pool, cache.pool_v[take].float(), arrange(v_q))
    return k.reshape(b, m * g, hk, d), v.reshape(b, m * g, hk, d)
