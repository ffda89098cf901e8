"""The baseline cache: raw fp16/bf16 K/V pages with the same paging as the KVarN cache.

`k`, `v`: [num_blocks, G, num_kv_heads, D] in the cache dtype, unrotated, addressed by the
same block tables and slot mappings (block * G + offset) as `kvarn_jax.cache`, so a model
step can swap one cache for the other and the comparison isolates quantization.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    k: jax.Array
    v: jax.Array

    @property
    def tile(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]


def init(num_blocks: int, num_kv_heads: int, head_dim: int, *, tile: int,
         dtype=jnp.float16) -> PagedCache:
    if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"the baseline cache holds float16, bfloat16 or float32; got {dtype}")
    shape = (num_blocks, tile, num_kv_heads, head_dim)
    return PagedCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def append(cache: PagedCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> PagedCache:
    """k, v [T, Hk, D] at cache positions `slot_mapping` [T] (-1 = padding, skipped)."""
    g = cache.tile
    valid = slot_mapping >= 0
    block = jnp.where(valid, slot_mapping // g, cache.num_blocks)  # out of range: dropped
    offset = jnp.where(valid, slot_mapping % g, 0)
    return PagedCache(
        k=cache.k.at[block, offset].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[block, offset].set(v.astype(cache.v.dtype), mode="drop"),
    )


def gather_kv(cache: PagedCache, block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K, V [B, M * G, Hk, D] of each sequence's blocks, in the cache dtype (unused table
    entries read block 0; attention masks them by length)."""
    b, m = block_tables.shape
    blk = jnp.maximum(block_tables, 0)

    def read(pages):
        return pages[blk].reshape(b, m * cache.tile, cache.num_kv_heads, cache.head_dim)

    return read(cache.k), read(cache.v)
