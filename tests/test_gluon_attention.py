"""kvarn_torch.gluon_attention: the Gluon decode kernel of the quantized records (with the
Triton kernel for the pool blocks and the merge) against the exact float32 attention.

Gluon kernels have no interpreter: the numerical tests need a CUDA GPU (sm_90+); on the
CPU the wrapper's input checks run, and tests/test_triton_cross_compile.py compiles the
kernel for sm_90."""

import itertools
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels must be defined under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvarn.format import layout  # noqa: E402
from kvarn_torch import attention_reference, gluon_attention, triton_attention  # noqa: E402
from kvarn_torch import triton_quantize  # noqa: E402
from kvarn_torch.cache import KVarNCache  # noqa: E402

PRESET = "kvarn_k4v2_g128"
G, D = 128, 128
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}  # as tests/test_torch_attention.py
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs an sm_90+ GPU")


def serving_cache(lens: list[int], hk: int, dtype: torch.dtype, seed: int = 0):
    """Sequences of `lens` tokens over shuffled physical blocks: their first (sink) and
    partial last blocks in the pool, every other block a quantized record of K/V-like
    tiles (per-channel scales, an outlier channel) -> (cache, block tables, seq_lens)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    need = [max(1, -(-n // G)) for n in lens]
    n_blocks = sum(need) + 3
    scale = torch.exp(0.5 * torch.randn(1, 1, D, device="cuda", generator=gen))
    tiles = torch.randn(2, n_blocks * hk, G, D, device="cuda", generator=gen) * scale
    tiles[:, :, :, 3] *= 8.0
    recs = triton_quantize.quantize(tiles[0].to(dtype), (0.5 * tiles[1]).to(dtype), PRESET)
    pages = recs.view(n_blocks, hk, -1)
    ids = torch.randperm(n_blocks, device="cuda", generator=gen).to(torch.int32)
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32, device="cuda")
    b2s = torch.full((n_blocks,), -1, dtype=torch.int32, device="cuda")
    pooled, start = [], 0
    for i, nb in enumerate(need):
        blocks = ids[start:start + nb]
        table[i, :nb] = blocks
        pooled += sorted({int(blocks[0]), int(blocks[-1])})  # sink and tail
        start += nb
    b2s[torch.tensor(pooled, device="cuda").long()] = torch.arange(
        len(pooled), dtype=torch.int32, device="cuda")
    pool = torch.randn(len(pooled), G, hk, D, device="cuda", generator=gen).to(dtype)
    cache = KVarNCache(pages=pages, pool_k=pool, pool_v=0.5 * pool, block_to_slot=b2s,
                       slot_to_block=torch.tensor(pooled, dtype=torch.int32, device="cuda"),
                       dropped_tokens=torch.zeros((), dtype=torch.int32, device="cuda"),
                       preset=PRESET, sink_blocks=1)
    return cache, table, torch.tensor(lens, dtype=torch.int32, device="cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hk", [(8, 8), (32, 8), (16, 2)])
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_matches_exact_attention(dtype, hq, hk, splits):
    lens = [1, 127, 128, 129, 1000, 4097, 300]
    cache, table, seq_lens = serving_cache(lens, hk, dtype)
    q = torch.randn(len(lens), 1, hq, D, device="cuda", dtype=dtype)
    want = attention_reference.attention(q, cache, table, seq_lens)
    got = gluon_attention.attention(q, cache, table, seq_lens, splits=splits)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, want) < TOL[dtype]


@gpu
def test_quantized_only_and_empty_sequences():
    """No pool block at all in one sequence, none at all in another (length 0: zeros, as
    the Triton kernel gives)."""
    cache, table, seq_lens = serving_cache([2048, 2048], 8, torch.float16)
    cache.block_to_slot[table[0, 0].long()] = -1  # its sink quantized too (any record)
    seq_lens[1] = 0
    q = torch.randn(2, 1, 32, D, device="cuda", dtype=torch.float16)
    got = gluon_attention.attention(q, cache, table, seq_lens)
    want = attention_reference.attention(q[:1], cache, table[:1], seq_lens[:1])
    assert rel_err(got[:1], want) < TOL[torch.float16]
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    triton = triton_attention.attention(q, cache, table, seq_lens)
    assert rel_err(got[:1], triton[:1].float()) < TOL[torch.float16]


@gpu
def test_two_streams_on_a_side_stream_and_in_a_graph():
    """The record kernel runs on a side stream: the result is the same when the caller
    works on a stream of its own, and when the call is captured in a CUDA graph (the fork
    and join become graph branches) and replayed on new inputs written in place."""
    cache, table, seq_lens = serving_cache([1000, 4097, 300, 129] * 16, 8, torch.float16)
    q = torch.randn(64, 1, 32, D, device="cuda", dtype=torch.float16)
    want = gluon_attention.attention(q, cache, table, seq_lens)
    assert rel_err(want, attention_reference.attention(q, cache, table, seq_lens)) < 4e-3
    caller = torch.cuda.Stream()
    caller.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(caller):
        q.mul_(1.0)  # queued on the caller's stream ahead of the call that reads q
        got = gluon_attention.attention(q, cache, table, seq_lens)
    torch.cuda.current_stream().wait_stream(caller)
    assert torch.equal(got, want)
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(caller):
        gluon_attention.attention(q, cache, table, seq_lens, out=out)  # warm-up, eager
        with torch.cuda.graph(graph, stream=caller):
            gluon_attention.attention(q, cache, table, seq_lens, out=out)
    q2 = torch.randn_like(q)
    q.copy_(q2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gluon_attention.attention(q2, cache, table, seq_lens))


def test_record_splits_leave_the_pool_launch_its_programs():
    """Record and pool programs together fill about PROGRAMS_PER_SM per SM (the two run
    concurrently); at least one split, at most one per block and MAX_SPLITS."""
    per_sm, sms = gluon_attention.PROGRAMS_PER_SM, 132
    for pairs in (64, 128, 256, 512, 1024, 4096):
        s = gluon_attention.num_splits(pairs, 1, 1000, sms)
        assert s >= 1
        assert s == 1 or pairs * (s + 1) <= per_sm * sms < pairs * (s + 2)
    assert gluon_attention.num_splits(512, 1, 1000, sms) == 1  # 64 sequences x 8 KV heads
    assert gluon_attention.num_splits(128, 1, 1000, sms) == 7  # 16 x 8
    assert gluon_attention.num_splits(64, 1, 3, sms) == 3  # no more splits than blocks
    assert gluon_attention.num_splits(1, 1, 1000, sms) == gluon_attention.MAX_SPLITS


@gpu
def test_applies_from_min_kv_sequences():
    """Serving takes this kernel for decode batches of >= MIN_KV_SEQUENCES (sequence, KV
    head) pairs it handles, triton_attention's below and for everything else."""
    cache, _, _ = serving_cache([300], 8, torch.float16)
    n = gluon_attention.MIN_KV_SEQUENCES // 8
    q = torch.zeros(n, 1, 32, D, device="cuda", dtype=torch.float16)
    assert gluon_attention.applies(q, cache)
    assert not gluon_attention.applies(q[: n - 1], cache)
    assert not gluon_attention.applies(torch.zeros(n, 2, 32, D, device="cuda"), cache)


@pytest.mark.parametrize("shape,preset,why", [
    ((2, 2, 32, 128), PRESET, "decode queries"),
    ((2, 1, 32, 128), "kvarn_k4v4_g128", "k4v2"),
    ((2, 1, 32, 128), "kvarn_k4v2_g64", "128-token"),
    ((2, 1, 32, 64), PRESET, "head_dim 128"),
    ((2, 1, 32, 128), PRESET, "GQA groups <= 8"),
    ((2, 1, 32, 128), PRESET, "contiguous pages"),
    ((2, 1, 32, 128), PRESET, "CUDA tensors"),
])
def test_rejects_what_it_does_not_handle(shape, preset, why):
    hk = 2 if "GQA" in why else 8
    d = shape[3]
    g = 64 if "g64" in preset else G
    pool = torch.zeros(1, g, hk, d)
    pages = torch.zeros(4, hk, 32, dtype=torch.uint8)
    pages = pages[:, :, :16] if "contiguous" in why else pages  # (a TMA box needs them whole)
    cache = KVarNCache(pages=pages, pool_k=pool,
                       pool_v=pool, block_to_slot=torch.full((4,), -1, dtype=torch.int32),
                       slot_to_block=torch.zeros(1, dtype=torch.int32),
                       dropped_tokens=torch.zeros((), dtype=torch.int32), preset=preset)
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=f"the Gluon kernel takes {why}"):
        gluon_attention.attention(q, cache, torch.zeros(2, 4, dtype=torch.int32),
                                  torch.zeros(2, dtype=torch.int32))


def test_record_boxes_take_whole_fields():
    """The kernel's TMA boxes start on 128-byte lines of the record and take a_K with z_K
    and a_V with z_V as 4 lines each: the record layout it takes must keep them so, and a
    layout that would not is refused by name."""
    assert gluon_attention.RECORD_BOXES == (0, 64, 68, 70, 102, 104, 108)
    lay = layout(PRESET, D)
    assert lay.z_k.offset == lay.a_k.offset + 2 * D and lay.z_v.offset == lay.a_v.offset + 2 * G
    with pytest.raises(ValueError, match="TMA boxes take the k4v2_g128 record layout"):
        gluon_attention._record_lines(layout("kvarn_k4v4_g128", D))


def _view_offsets(view, shape: tuple[int, ...]) -> dict[tuple[int, ...], int]:
    """Element index -> offset under a SharedLinearLayout (its bases map offset bits to
    indices)."""
    bases = view.offset_bases
    out = {}
    for offset in range(1 << len(bases)):
        index = [0] * len(shape)
        for k, basis in enumerate(bases):
            if offset >> k & 1:
                index = [a ^ b for a, b in zip(index, basis)]
        out[tuple(index)] = offset
    assert sorted(out) == sorted(itertools.product(*map(range, shape)))
    return out


def _tma_box(record_part: np.ndarray) -> np.ndarray:
    """Words of a record field as a TMA box under the 128-byte swizzle leaves them in
    shared memory: 16-byte piece j of 128-byte line L lands at piece j ^ (L % 8)."""
    flat = record_part.reshape(-1, 8, 4)  # [line, piece, word]
    box = np.empty_like(flat)
    for line in range(flat.shape[0]):
        for piece in range(8):
            box[line, piece ^ line % 8] = flat[line, piece]
    return box.reshape(-1)


def test_k_view_reads_the_swizzled_box_without_bank_conflicts():
    """K_VIEW gives element (channel, halfword) of the K codes' box the halfword it names,
    and the 16-byte rows ldmatrix takes for a chunk (8 consecutive channels, halfwords
    8 c .. 8 c + 7) fall in 8 different 16-byte bank groups."""
    rng = np.random.default_rng(0)
    halves = rng.integers(0, 2**16, size=(D, G // 4)).astype(np.uint16)  # [channel, halfword]
    box = _tma_box(halves.view(np.uint32)).view(np.uint16)
    offsets = _view_offsets(gluon_attention.K_VIEW.value, (D, G // 4))
    for (ch, hw), off in offsets.items():
        assert box[off] == halves[ch, hw]
    for c in range(4):
        for ch0 in range(0, D, 8):
            groups = {offsets[(ch, 8 * c)] // 8 % 8 for ch in range(ch0, ch0 + 8)}
            assert len(groups) == 8
            assert all(offsets[(ch, 8 * c + i)] == offsets[(ch, 8 * c)] + i
                       for ch in range(ch0, ch0 + 8) for i in range(8))


def test_v_view_reads_the_swizzled_box_without_bank_conflicts():
    """V_VIEW, chunk c at 256 c words, gives each index of V_READ the word it names (word
    col % 8 of token 32 c + r + 8 (col // 8)), and each register of V_READ spreads the 32
    lanes over the 32 banks."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**31, size=(G, D // 16))  # [token, word] in the record
    box = _tma_box(words)
    offsets = _view_offsets(gluon_attention.V_VIEW.value, (8, 32))
    for c in range(4):
        for (r, col), off in offsets.items():
            assert box[256 * c + off] == words[32 * c + r + 8 * (col // 8), col % 8]
    read = gluon_attention.V_READ.value
    for reg in range(1 << len(read.reg_bases)):
        banks = set()
        for lane in range(32):
            index = [0, 0]
            for bases, bits in ((read.reg_bases, reg), (read.lane_bases, lane)):
                for k, basis in enumerate(bases):
                    if bits >> k & 1:
                        index = [a ^ b for a, b in zip(index, basis)]
            banks.add(offsets[tuple(index)] % 32)
        assert len(banks) == 32


def test_sigma_view_follows_the_output_rows():
    """sigma_V is read in the order of the PV accumulator's rows: row n holds channel
    16 (n % 8) + 8 (n // 8 % 2) + n // 16, the channel the kernel stores it to."""
    offsets = _view_offsets(gluon_attention.SIGMA_VIEW.value, (D,))
    assert [offsets[(n,)] for n in range(D)] == [16 * (n % 8) + 8 * (n // 8 % 2) + n // 16
                                                  for n in range(D)]


def test_shared_view_refuses_what_no_linear_layout_can_hold():
    with pytest.raises(ValueError, match="bijection"):
        gluon_attention._shared_view((4, 4), lambda i: i[0])
    with pytest.raises(ValueError, match="linear"):
        gluon_attention._shared_view((8,), lambda i: {4: 5, 5: 4}.get(i[0], i[0]))
