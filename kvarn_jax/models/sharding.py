"""KV heads sharded across devices: each device holds and attends over its own KV heads.

A KVarN record, a pool block and a paged fp16 block are all per (block, KV head), and
attention never mixes KV heads (GQA groups the query heads of one KV head together), so
splitting the caches along the KV-head axis needs no communication inside attention:
`attend_sharded` runs the cache write and attention under `shard_map` on each device's
heads and all-gathers the attention output (a copy, no arithmetic) before `o_proj`.

The dense layers stay replicated. Sharding `o_proj` by heads would sum its partial
products across devices in another order than one device does, so the logits, the next
layer's K/V and eventually quantized bytes would differ in the last bits; replicated, the
sharded model gives the unsharded tokens and cache bytes exactly (tests/test_sharding.py).
What sharding buys here is cache capacity and attention bandwidth, which is what grows
with context.

Use: `AttentionOptions(mesh=kv_mesh())` in `generate` / `score` / `Session`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvarn_jax.cache import KVarNCache
from kvarn_jax.models.paged_cache import PagedCache

AXIS = "kv"
HEADS = P(None, None, AXIS, None)  # [*, *, heads, D]: q, k, v, pool blocks, fp16 pages


def kv_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) whose axis splits the KV heads."""
    devs = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devs), (AXIS,))


def check_heads(num_kv_heads: int, mesh: Mesh) -> None:
    n = mesh.shape[AXIS]
    if num_kv_heads % n:
        divisors = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise ValueError(f"cannot shard {num_kv_heads} KV heads over {n} devices: each device "
                         f"must hold whole KV heads; use a device count that divides "
                         f"{num_kv_heads} ({', '.join(map(str, divisors))})")


def cache_specs(cache):
    """PartitionSpecs of a layer cache: split along KV heads, bookkeeping replicated."""
    if isinstance(cache, KVarNCache):
        return dataclasses.replace(cache, pages=P(None, AXIS, None), pool_k=HEADS, pool_v=HEADS,
                                   block_to_slot=P(), slot_to_block=P(), dropped_tokens=P())
    if isinstance(cache, PagedCache):
        return PagedCache(k=HEADS, v=HEADS)
    raise TypeError(f"unknown cache type {type(cache).__name__}")


def shard_cache(cache, mesh: Mesh):
    """Place a layer cache on the mesh (each device gets its KV heads' records/pages)."""
    check_heads(cache.num_kv_heads, mesh)
    specs = cache_specs(cache)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def attend_sharded(local_attend, q, k, v, cache, batch, *, fresh: bool, scale: float, opts):
    """`local_attend` (llama's per-layer attention) on each device's KV heads.
    q [B, S, Hq, D], k, v [B, S, Hk, D]; returns (out [B, S, Hq, D] replicated, cache)."""
    mesh = opts.mesh
    check_heads(cache.num_kv_heads, mesh)
    local_opts = dataclasses.replace(opts, mesh=None)
    # Replicated projections: every device computes q/k/v as one device would (see above).
    rep = NamedSharding(mesh, P())
    q, k, v = (jax.lax.with_sharding_constraint(x, rep) for x in (q, k, v))

    def body(q, k, v, cache, batch):
        out, cache = local_attend(q, k, v, cache, batch, fresh=fresh, scale=scale, opts=local_opts)
        return jax.lax.all_gather(out, AXIS, axis=2, tiled=True), cache

    specs = cache_specs(cache)
    # Slot bookkeeping is computed identically on every device (it depends only on the
    # slot mapping), so returning it as replicated is sound; check_vma cannot see that.
    return jax.shard_map(body, mesh=mesh, in_specs=(HEADS, HEADS, HEADS, specs, P()),
                         out_specs=(P(), specs), check_vma=False)(q, k, v, cache, batch)
