"""Compile, before serving, every Triton kernel variant a serving step can launch.

Triton compiles a kernel the first time it meets a new set of constexprs. In a serving
engine that happens in the middle of a step, with the GPU idle for seconds: on a cold
Triton cache, an H200's first 48 x 8K vLLM burst spent ~4.5 s compiling attention
variants that the warm-up bursts had not met. The variants of one model are few (the
runtime ints and sliced table pointers are not specialized, see triton_attention): the
attention programs `launch_config` can pick (16, 32 or 64 query rows), each split or
not (split adds the merge kernel), the gather kernel of long prefill continuations, the
rotation of their queries, the pool write of new tokens and the quantize kernel of a
commit, and on GPUs that run it the Gluon decode kernel with its pool launch (merging the
record splits itself, or leaving them to the merge kernel).
`compile_kernels` launches each once on a scratch cache of two blocks; Triton
keeps them in memory and on disk.
"""

from __future__ import annotations

import itertools
import math

import torch

from kvarn.format import layout
from kvarn_torch import cache as kvcache
from kvarn_torch import codec, gluon_attention, triton_attention, triton_gather


def attention_variants(num_q_heads: int, num_kv_heads: int, head_dim: int,
                       tile: int) -> list[tuple[int, int, int]]:
    """Every (rows, block_n, num_warps) `launch_config` picks for launches of this model:
    its row-size buckets are wide, so query lengths of 1, 2, 4, ... tokens up to the
    64-row threshold reach each one the GQA group can."""
    group = num_q_heads // num_kv_heads
    top = math.ceil(math.log2(triton_attention.CHUNK_MIN_ROWS))
    return sorted({triton_attention.launch_config(head_dim, tile, group * 2**i)
                   for i in range(top + 1)})


def compile_kernels(preset: str, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device | str,
                    chunk_invariant: bool = False) -> int:
    """Launch every kernel variant once for this model shape (and the attention kernel's
    chunk-invariant reads, if they serve); -> number of launches."""
    g = layout(preset, head_dim).preset.tile
    cache = kvcache.init(2, num_kv_heads, head_dim, pool_slots=1, dtype=dtype, preset=preset,
                         device=device)
    cache.block_to_slot[0] = 0  # block 0 in the pool, block 1 quantized: both tile paths
    tables = torch.tensor([[0, 1]], dtype=torch.int32, device=device)  # as vLLM's tables
    seq_lens = torch.tensor([2 * g], dtype=torch.int32, device=device)
    query_lens = torch.ones(1, dtype=torch.int32, device=device)
    q = torch.zeros((1, 1, num_q_heads, head_dim), dtype=dtype, device=device)
    launches = 0
    for rows, block_n, warps in attention_variants(num_q_heads, num_kv_heads, head_dim, g):
        for splits, invariant in itertools.product((1, 2), {False, chunk_invariant}):
            triton_attention.attention(q, cache, tables, seq_lens, query_lens, splits=splits,
                                       rows=rows, block_n=block_n, num_warps=warps,
                                       chunk_invariant=invariant)
            launches += splits  # the split launch is followed by the merge kernel
    if gluon_attention.unsupported(q, cache) is None:  # the decode kernel of large batches
        wide = -(-gluon_attention.NARROW_POOL_MIN_PROGRAMS // num_kv_heads)
        for b in (1, wide):  # the pool launch's two program shapes
            qb, tb = q.expand(b, -1, -1, -1).contiguous(), tables.expand(b, -1).contiguous()
            lb = seq_lens.expand(b).contiguous()
            gluon_attention.attention(qb, cache, tb, lb)
            launches += 3  # records, pool, merge
    triton_gather.gather(cache, tables[0], 2)
    codec.rotate(q[0])  # the query heads of dense continuations
    kv = torch.zeros((1, num_kv_heads, head_dim), dtype=dtype, device=device)
    slots = torch.zeros(1, dtype=torch.int64, device=device)  # vLLM's slot mappings are int64
    kvcache.write(cache, kv, kv, slots)
    cache.slot_to_block[0] = 0  # block 0's slot: a flush moves and quantizes its tiles
    marked = torch.zeros(2, dtype=torch.bool, device=device)
    kvcache.flush(cache, marked.logical_not(), marked, max_tiles=1)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return launches + 6  # gather, rotate, write; a flush: copy in, quantize, copy out
