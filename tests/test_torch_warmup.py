"""kvarn_torch.warmup: every kernel variant a serving step can launch is compiled up front.

On the CPU the kernels run in Triton's interpreter (nothing to compile): there the
warm-up must run and cover every launch configuration; on a GPU, serving-shaped calls
after it must not compile anything new.
"""

import dataclasses

import pytest
import torch

import kvarn_torch  # noqa: F401  (Triton's interpreter without a GPU)
from kvarn_torch import cache as kc
from kvarn_torch import (gluon_attention, triton_attention, triton_gather, triton_tiles,
                         triton_write, warmup)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads", [(32, 8), (9, 3), (16, 1), (4, 4), (24, 1), (64, 2)])
@pytest.mark.parametrize("head_dim,tile", [(64, 64), (128, 128), (256, 128)])
def test_variants_cover_every_launch_config(heads, head_dim, tile):
    hq, hk = heads
    want = {triton_attention.launch_config(head_dim, tile, tokens * (hq // hk))
            for tokens in range(1, 8193)}
    assert set(warmup.attention_variants(hq, hk, head_dim, tile)) == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_kernels_runs(dtype):
    n = warmup.compile_kernels("kvarn_k4v2_g64", 4, 2, 64, dtype, DEVICE)
    assert n == 3 * (1 + 2) + 6  # 3 row sizes, unsplit and split (+ merge); 6 others


def test_compile_kernels_with_chunk_invariant_reads():
    n = warmup.compile_kernels("kvarn_k4v2_g64", 4, 2, 64, torch.float16, DEVICE,
                               chunk_invariant=True)
    assert n == 2 * 3 * (1 + 2) + 6  # each attention launch twice: plain and chunk-invariant


def _compiled(kernel) -> int:
    return sum(len(c[0]) for c in kernel.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serving_calls_compile_nothing_after_warmup():
    preset, hq, hk, d, g = "kvarn_k4v2_g128", 32, 8, 128, 128
    warmup.compile_kernels(preset, hq, hk, d, torch.float16, DEVICE, chunk_invariant=True)
    kernels = (triton_attention._attention_kernel, triton_attention._merge_kernel,
               triton_gather._gather_kernel, triton_write._write_kernel,
               triton_tiles._copy_kernel)
    before = [_compiled(k) for k in kernels]

    cache = kc.init(300, hk, d, pool_slots=8, preset=preset, device=DEVICE)
    cache.block_to_slot[:4] = torch.arange(4, dtype=torch.int32, device=DEVICE)
    tables = torch.arange(300, dtype=torch.int32, device=DEVICE).view(30, 10)
    lens = torch.full((30,), 10 * g - 7, dtype=torch.int32, device=DEVICE)
    for b, sq in [(1, 1), (16, 1), (24, 1), (1, 5), (3, 4), (1, 40), (1, 300), (1, 1000)]:
        for r0 in (0, 3):  # table slices at unaligned offsets, as in a mixed batch
            q = torch.randn(b * sq, hq, d, device=DEVICE, dtype=torch.float16)
            for invariant in (False, True):  # KVARN_CHUNK_INVARIANT's reads too
                triton_attention.attention(q.view(b, sq, hq, d), cache, tables[r0: r0 + b],
                                           lens[r0: r0 + b], chunk_invariant=invariant)
    # the Gluon decode: many record splits (merge kernel), a few (merged in the pool
    # launch), the 2-warp pool launch of wide batches
    for b in (1, 30, 64):
        rows = torch.arange(b, device=DEVICE) % 30
        q = torch.randn(b, 1, hq, d, device=DEVICE, dtype=torch.float16)
        if gluon_attention.unsupported(q, cache) is None:
            gluon_attention.attention(q, cache, tables[rows], lens[rows])
    triton_gather.gather(cache, tables[7], 10)
    for t in (1, 16, 300):  # K and V as vLLM hands them: slices of the fused qkv projection
        qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE, dtype=torch.float16)
        k, v = (x.view(t, hk, d) for x in qkv[:, hq * d:].split(hk * d, dim=1))
        kc.write(cache, k, v, torch.arange(t, device=DEVICE) + 4 * g)
    cache.slot_to_block[:4] = torch.arange(4, dtype=torch.int32, device=DEVICE)
    layers = [cache, dataclasses.replace(cache, pages=cache.pages.clone(),
                                         pool_k=cache.pool_k.clone(), pool_v=cache.pool_v.clone())]
    marked = torch.zeros(300, dtype=torch.bool, device=DEVICE)
    kc.flush(layers, marked.logical_not(), marked, max_tiles=3)  # a commit's flush, 2 layers
    after = [_compiled(k) for k in kernels]
    assert after == before, [f"{k.__name__}: {a} -> {b} variants"
                             for k, a, b in zip(kernels, before, after) if a != b]
