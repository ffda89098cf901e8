"""kvarn_torch's paged KVarN cache and the Triton attention kernel over it.

* the cache rules (commit only accepted full blocks, sinks stay in the pool, release
  quantizes full blocks and drops partial ones, pool exhaustion is counted) and byte
  identity with kvarn_jax.cache for the same sequence of operations;
* the kernel (in Triton's interpreter when no GPU is present) against the exact float32
  attention of kvarn_torch.attention_reference: decode and multi-query rows, causal and
  not, pool-only / quantized-only / mixed blocks, ragged batches, split and unsplit,
  GQA ratios, fp16 and bf16, several presets and head dims;
* the errors of bad inputs.
"""

import dataclasses
import os

import torch

if not torch.cuda.is_available():  # the kernels must be defined under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kvarn_jax  # noqa: E402,F401  (before jax: exact CPU arithmetic for the JAX cache)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kvarn_torch  # noqa: E402,F401
from kvarn.format import get_preset, layout  # noqa: E402
from kvarn_jax import cache as jcache  # noqa: E402
from kvarn_torch import attention_reference, codec, gluon_attention, reference  # noqa: E402
from kvarn_torch import triton_attention, triton_gather, triton_tiles  # noqa: E402
from kvarn_torch import cache as kc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerance on max |out - exact| / max |exact| over the valid rows. The reference is float32
# throughout; the kernel rounds the dot operands to fp16 (the query and p to the model
# dtype against pool blocks) and the output to the model dtype, which dominates for bf16
# (and Triton's interpreter rounds float32 -> bf16 by truncation).
# The kernels round q * scale and p * scale to fp16 for the tensor-core dots: on the GPU the
# max error reaches ~3e-3 of the output range with fp16 models (2-bit presets, multi-query).
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------- helpers


def kv_like(gen: torch.Generator, n: int, hk: int, d: int) -> torch.Tensor:
    """[n, hk, d] float32 K/V-like values: per-channel scales and offsets, one outlier channel."""
    x = torch.randn(n, hk, d, generator=gen)
    scale = torch.exp(0.5 * torch.randn(1, hk, d, generator=gen))
    x = x * scale + 0.3 * torch.randn(1, hk, d, generator=gen)
    x[:, :, 3] *= 8.0
    return x


def block_table(gen: torch.Generator, lens, g: int, num_blocks: int) -> torch.Tensor:
    """[B, M] int32: shuffled physical blocks, -1 past each sequence's last block."""
    need = [-(-n // g) for n in lens]
    ids = torch.randperm(num_blocks, generator=gen)[: sum(need)].to(torch.int32)
    bt = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for i, m in enumerate(need):
        bt[i, :m] = ids[at : at + m]
        at += m
    return bt


def slot_mapping(bt: torch.Tensor, seq: int, start: int, stop: int, g: int) -> torch.Tensor:
    pos = torch.arange(start, stop)
    return bt[seq, pos // g].long() * g + pos % g


def build_cache(*, preset="kvarn_k4v2_g64", d=64, hk=2, dtype=torch.float16, lens=(150, 70),
                state="mixed", seed=0):
    """A cache holding `lens` tokens per sequence (shuffled physical blocks), filled by one
    prefill append and then:
    state "pool": nothing committed; "mixed": a decode-style commit (full accepted blocks
    past the sink are quantized); "quantized": sink_blocks=0 and every full block committed.
    """
    gen = torch.Generator().manual_seed(seed)
    g = get_preset(preset).tile
    num_blocks = sum(-(-n // g) for n in lens) + 3
    cache = kc.init(num_blocks, hk, d, pool_slots=num_blocks, dtype=dtype, preset=preset,
                    sink_blocks=0 if state == "quantized" else 1, device=DEVICE)
    bt = block_table(gen, lens, g, num_blocks)
    padding = -torch.ones(3, dtype=torch.long)
    sm = torch.cat([slot_mapping(bt, i, 0, n, g) for i, n in enumerate(lens)] + [padding])
    t = sm.shape[0]
    k, v = kv_like(gen, t, hk, d).to(dtype), kv_like(gen, t, hk, d).to(dtype)
    kc.append(cache, k.to(DEVICE), v.to(DEVICE), sm.to(DEVICE), impl="reference")
    bt, sl = bt.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    if state == "mixed":
        kc.commit(cache, bt, sl, torch.ones_like(sl), impl="reference")
    elif state == "quantized":
        kc.commit(cache, bt, sl, torch.zeros_like(sl), impl="reference")
    return cache, bt, sl


def check_attention(cache, bt, sl, *, hq, sq=1, query_lens=None, causal=True, splits=None,
                    rows=None, block_n=None, seed=1):
    """Run the kernel and the exact reference on one random query; return the relative error."""
    gen = torch.Generator().manual_seed(seed)
    b, d = bt.shape[0], cache.head_dim
    q = (2.0 * torch.randn(b, sq, hq, d, generator=gen)).to(cache.dtype).to(DEVICE)
    ql = None if query_lens is None else torch.tensor(query_lens, dtype=torch.int32, device=DEVICE)
    want = attention_reference.attention(q, cache, bt, sl, ql, causal=causal)
    got = triton_attention.attention(q, cache, bt, sl, ql, causal=causal, splits=splits,
                                     rows=rows, block_n=block_n)
    assert got.shape == q.shape and got.dtype == q.dtype
    rows = torch.arange(sq, device=DEVICE)[None, :] < (ql[:, None] if ql is not None else sq)
    rows = rows.expand(b, sq)
    err = (got.float() - want)[rows].abs().max() / want[rows].abs().max()
    assert torch.isfinite(got[rows]).all()
    tol = TOL[cache.dtype]
    assert err < tol, f"relative error {err:.2e} > {tol}"
    return got, err


def in_pool(cache) -> set[int]:
    return {int(b) for b in cache.slot_to_block.cpu() if b >= 0}


# ---------------------------------------------------------------- attention kernel

ATTENTION_CASES = [
    # preset, d, dtype, hk, group, lens
    ("kvarn_k4v2_g64", 64, torch.float16, 2, 4, (150, 70, 1)),
    ("kvarn_k4v2_g128", 128, torch.bfloat16, 1, 16, (300, 129)),
    ("kvarn_k4v4_g64", 256, torch.float16, 1, 1, (130,)),
    ("kvarn_k2v2_g64", 64, torch.bfloat16, 2, 2, (200, 64)),
    ("kvarn_k4v4_g128", 64, torch.float16, 2, 8, (260, 5)),
    ("kvarn_k2v2_g128", 128, torch.float16, 1, 4, (257,)),
]


@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=lambda c: f"{c[0]}-d{c[1]}-{str(c[2])[6:]}-gqa{c[4]}")
def test_decode_mixed_blocks(case):
    preset, d, dtype, hk, group, lens = case
    cache, bt, sl = build_cache(preset=preset, d=d, hk=hk, dtype=dtype, lens=lens)
    in_pages = cache.block_to_slot[bt[bt >= 0].long()] < 0
    assert in_pages.any() and not in_pages.all()  # both kinds of blocks
    check_attention(cache, bt, sl, hq=hk * group)


@pytest.mark.parametrize("state", ["pool", "quantized"])
def test_decode_pool_only_and_quantized_only(state):
    cache, bt, sl = build_cache(lens=(128, 192, 64), state=state)
    used = bt[bt >= 0].long()
    in_pages = cache.block_to_slot[used] < 0
    assert in_pages.all() if state == "quantized" else not in_pages.any()
    check_attention(cache, bt, sl, hq=4)


def test_split_and_unsplit_agree():
    cache, bt, sl = build_cache(lens=(400, 90, 3))
    one, _ = check_attention(cache, bt, sl, hq=4, splits=1)
    for splits in (2, 5):
        many, _ = check_attention(cache, bt, sl, hq=4, splits=splits)
        assert (many.float() - one.float()).abs().max() < 2e-3
    # more splits than tiles (most empty) and than one merge chunk (MERGE_SPLIT_CHUNK); a tile
    # per split rounds each tile's p to fp16 against its own max: within the tolerance
    check_attention(cache, bt, sl, hq=4, splits=40)


@pytest.mark.parametrize("state", ["mixed", "pool"])
def test_pool_tiles_in_several_scan_chunks(state):
    """More tiles than one look-up of pool slots (POOL_SCAN) covers: the pool tiles of every
    chunk are visited, the sink's and the tail's (mixed) or all of them (pool)."""
    cache, bt, sl = build_cache(lens=(1100, 40), state=state)
    assert -(-1100 // 16) > triton_attention.POOL_SCAN.value
    check_attention(cache, bt, sl, hq=4, block_n=16, splits=1)


def test_sub_block_tiles():
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g128", d=64, lens=(300, 100))
    check_attention(cache, bt, sl, hq=4, block_n=32, splits=3)


def exact_partials(q, cache, bt, sl, splits: int, rows: int, pool_splits: int = 1):
    """Split-KV partials of the quantized blocks alone, as gluon_attention's kernel leaves
    them, in buffers with room for the pool's: [B, Hk, 1, splits + pool_splits, rows, D]
    unnormalized outputs (rotated frame) and [..., 2, rows] base-2 max and sum. Blocks go
    to splits in order; a split without tokens holds zeros, sum 0 and max -inf, and the
    padding rows past the GQA group NaN (they must not be read)."""
    b, _, hq, d = q.shape
    hk, g = cache.num_kv_heads, cache.tile
    group = hq // hk
    k, v = kc.gather_kv(cache, bt)  # [B, T, Hk, D]
    qr = reference.rotate(q.float())[:, 0].reshape(b, hk, group, d)
    s2 = torch.einsum("bhgd,bthd->bhgt", qr, k) * d ** -0.5 * triton_attention.LOG2E
    part_o = torch.full((b, hk, 1, splits + pool_splits, rows, d), float("nan"))
    part_ml = torch.full((b, hk, 1, splits + pool_splits, 2, rows), float("nan"))
    for i in range(b):
        blocks = [j for j in range(-(-int(sl[i]) // g)) if cache.block_to_slot[bt[i, j]] < 0]
        per = -(-len(blocks) // splits) if blocks else 1
        for s in range(splits):
            mine = blocks[s * per: (s + 1) * per]
            pos = [t for j in mine for t in range(j * g, min((j + 1) * g, int(sl[i])))]
            if not pos:
                part_o[i, :, 0, s, :group] = 0.0
                part_ml[i, :, 0, s, 0, :group] = float("-inf")
                part_ml[i, :, 0, s, 1, :group] = 0.0
                continue
            x = s2[i][:, :, pos]  # [Hk, group, n]
            m = x.max(-1).values
            p = torch.exp2(x - m[..., None])
            part_o[i, :, 0, s, :group] = torch.einsum("hgn,nhd->hgd", p, v[i, pos])
            part_ml[i, :, 0, s, 0, :group] = m
            part_ml[i, :, 0, s, 1, :group] = p.sum(-1)
    return part_o.to(DEVICE), part_ml.to(DEVICE)


def test_pool_partial_merges_with_the_partials_of_another_kernel():
    """gluon_attention's launches (GPU-only there), here with exact partials of the
    quantized blocks: the pool launch writes the sink and tail blocks' partials after
    them (in one split or several), and the merge kernel stores the whole attention
    (padding rows unread), in one load of partials or several."""
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g128", d=128, hk=2, lens=(700, 300, 129, 5))
    hq = 8
    gen = torch.Generator().manual_seed(4)
    q = (2.0 * torch.randn(bt.shape[0], 1, hq, 128, generator=gen)).half().to(DEVICE)
    want = attention_reference.attention(q, cache, bt, sl)
    # 6: empty splits; 3 pool splits of a 2-block sequence: an empty one
    # the 2-warp, 64-token-tile launch of wide batches too (gluon_attention.NARROW_POOL)
    for splits, pool_splits, chunk, shape in ((1, 1, 32, {}), (3, 2, 32, {}), (6, 3, 4, {}),
                                              (2, 1, 32, gluon_attention.NARROW_POOL)):
        part_o, part_ml = exact_partials(q, cache, bt, sl, splits, 16, pool_splits)
        assert triton_attention.attention(q, cache, bt, sl, splits=pool_splits, rows=16,
                                          pool_partials=(part_o, part_ml, splits),
                                          **shape) is None
        got = torch.empty_like(q)
        triton_attention.merge(part_o, part_ml, got, 1, hq // cache.num_kv_heads,
                               split_chunk=chunk)
        assert torch.isfinite(got).all()
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < TOL[torch.float16], f"{splits} + {pool_splits} splits: error {err:.2e}"
    with pytest.raises(ValueError, match="room for the pool's 2 splits from split 3"):
        part_o, part_ml = exact_partials(q, cache, bt, sl, 3, 16, 1)
        triton_attention.attention(q, cache, bt, sl, splits=2, rows=16,
                                   pool_partials=(part_o, part_ml, 3))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_query_rows(causal, dtype):
    # ragged: sequence 1 has 2 real query rows of 4, sequence 2 one (decode in a verify batch)
    cache, bt, sl = build_cache(lens=(150, 66, 90), dtype=dtype)
    check_attention(cache, bt, sl, hq=4, sq=4, query_lens=(4, 2, 1), causal=causal)
    check_attention(cache, bt, sl, hq=4, sq=4, query_lens=(4, 2, 1), causal=causal, splits=3)


@pytest.mark.parametrize("rows", [None, 64])
def test_multi_query_row_blocks(rows):
    # 20 query tokens x 4 heads = 80 rows: three row blocks of 32 (the default), two of 64
    cache, bt, sl = build_cache(lens=(170, 40), hk=1)
    check_attention(cache, bt, sl, hq=4, sq=20, query_lens=(20, 20), splits=2, rows=rows)


def test_causal_row_sees_only_its_prefix():
    """Row i must not see tokens after its position: changing them leaves it unchanged."""
    cache, bt, sl = build_cache(lens=(100,), hk=1, state="pool")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 2, 64, generator=gen).half().to(DEVICE)
    before = triton_attention.attention(q, cache, bt, sl)
    slot = int(cache.block_to_slot[bt[0, 1]])
    cache.pool_k[slot, 100 - 64 - 1] += 5.0  # the last token: only the last row sees it
    cache.pool_v[slot, 100 - 64 - 1] += 5.0
    after = triton_attention.attention(q, cache, bt, sl)
    assert torch.equal(before[:, :3], after[:, :3])
    assert not torch.equal(before[:, 3], after[:, 3])


def _snapshot_full_blocks(cache, bt, sl):
    """Records for every full block past the sinks, the blocks left in the pool."""
    g = cache.tile
    full = [int(b) for i, n in enumerate(sl.tolist())
            for b in bt[i, cache.sink_blocks: n // g].tolist()]
    kc.snapshot(cache, torch.tensor(full, dtype=torch.int32, device=DEVICE), impl="reference")


@pytest.mark.parametrize("causal,splits", [(True, 1), (False, 1), (True, 3)])
def test_chunk_invariant_rows_read_earlier_blocks_from_records(causal, splits):
    """A prefill chunk whose rows span several pool blocks: each row reads the blocks
    before its own (sink excepted) from their records, its own block as stored."""
    cache, bt, sl = build_cache(lens=(200, 150), state="pool", dtype=torch.bfloat16)
    _snapshot_full_blocks(cache, bt, sl)
    assert in_pool(cache) == {int(b) for b in bt.flatten() if b >= 0}  # slots kept
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 160, 4, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    ql = torch.tensor([160, 100], dtype=torch.int32, device=DEVICE)
    got = triton_attention.attention(q, cache, bt, sl, ql, causal=causal, splits=splits,
                                     chunk_invariant=True)
    want = attention_reference.attention(q, cache, bt, sl, ql, causal=causal,
                                         chunk_invariant=True)
    plain = attention_reference.attention(q, cache, bt, sl, ql, causal=causal)
    rows = torch.arange(160, device=DEVICE)[None, :] < ql[:, None]
    err = (got.float() - want)[rows].abs().max() / want[rows].abs().max()
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"
    moved = (plain - want)[rows].abs().max() / want[rows].abs().max()
    assert moved > 3 * TOL[torch.bfloat16], "the records must differ from the raw blocks"


def test_chunk_invariant_row_matches_a_committed_context_bit_for_bit():
    """Rows of block 2 whose block 1 was filled in the same step (in the pool, record
    written ahead) give the bits they give once block 1 is committed: a row's result
    does not depend on which step filled the blocks before it."""
    cache, bt, sl = build_cache(lens=(170,), hk=1, state="pool")
    _snapshot_full_blocks(cache, bt, sl)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 30, 2, 64, generator=gen).half().to(DEVICE)  # positions 140..169
    same_step = triton_attention.attention(q, cache, bt, sl, chunk_invariant=True)
    kc.commit(cache, bt, sl, torch.tensor([30], dtype=torch.int32, device=DEVICE),
              impl="reference")
    assert int(cache.block_to_slot[bt[0, 1]]) == -1  # block 1 committed, block 2 not
    later = triton_attention.attention(q, cache, bt, sl, chunk_invariant=True)
    assert torch.equal(same_step, later)
    with pytest.raises(ValueError, match="1-D integer tensor of block ids"):
        kc.snapshot(cache, bt.float())
    assert torch.equal(later, triton_attention.attention(q, cache, bt, sl, splits=1))


def test_chunk_invariant_row_is_the_same_in_any_batch_and_as_a_verify_row(monkeypatch):
    """Chunk-invariant launches split a sequence at fixed positions: the decode row of a
    position gives the same bits alone, in a wider batch with a wider block table, and
    as the last row of a verify window ending there."""
    monkeypatch.setattr(triton_attention, "INVARIANT_SPLIT_TOKENS", 128)  # 2 tiles a split
    # 4 SMs: the default rule then splits a lone sequence in two and a batch of 3 not at all
    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 4)
    cache, bt, sl = build_cache(lens=(300, 70, 200), seed=5)
    gen = torch.Generator().manual_seed(6)
    window = torch.randn(1, 4, 4, 64, generator=gen).half().to(DEVICE)  # positions 296..299
    others = torch.randn(2, 1, 4, 64, generator=gen).half().to(DEVICE)

    def run(q, rows, width_pad=0, invariant=True):
        table = torch.nn.functional.pad(bt[rows], (0, width_pad), value=-1)
        return triton_attention.attention(q, cache, table, sl[rows], chunk_invariant=invariant)

    verify = run(window, [0])
    alone = run(window[:, 3:], [0])
    batch_q = torch.cat([others[:1], window[:, 3:], others[1:]])
    batch = run(batch_q, [1, 0, 2], width_pad=3)
    assert torch.equal(alone[0, 0], verify[0, 3])
    assert torch.equal(batch[1, 0], alone[0, 0])
    if not torch.cuda.is_available():  # the interpreter's rounding shows the default rule
        plain = run(batch_q, [1, 0, 2], width_pad=3, invariant=False)
        assert not torch.equal(plain[1, 0], run(window[:, 3:], [0], invariant=False)[0, 0])


def _serve(schedule, chunk_invariant, n=160, hq=2, d=64, seed=0):
    """One sequence of n tokens served in steps of `schedule` query rows, as the vLLM
    bridge runs them: commit what earlier steps filled, append the step's K/V, write the
    records of the blocks the step fills ahead of its later rows (chunk_invariant), then
    attend. -> every row's output [n, hq, d]."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (kv_like(gen, n, 1, d).half().to(DEVICE) for _ in range(2))
    q = (2 * torch.randn(n, hq, d, generator=gen)).half().to(DEVICE)
    cache = kc.init(8, 1, d, pool_slots=8, preset="kvarn_k4v2_g64", device=DEVICE)
    g, bt = cache.tile, torch.tensor([[3, 1, 6, 0, 7, 2]], dtype=torch.int32, device=DEVICE)
    out, done = torch.empty_like(q), 0
    for m in schedule:
        sl, ql = (torch.tensor([x], dtype=torch.int32, device=DEVICE) for x in (done + m, m))
        kc.commit(cache, bt, sl, ql, impl="reference")
        pos = torch.arange(done, done + m, device=DEVICE)
        kc.append(cache, k[done: done + m], v[done: done + m],
                  bt[0, pos // g].long() * g + pos % g, impl="reference")
        if chunk_invariant:
            j = torch.arange(bt.shape[1], device=DEVICE)
            fills = (j >= cache.sink_blocks) & ((j + 1) * g - 1 >= done) & ((j + 1) * g < done + m)
            kc.snapshot(cache, torch.where(fills, bt[0], -1), impl="reference")
        out[done: done + m] = triton_attention.attention(
            q[done: done + m][None], cache, bt, sl, ql, chunk_invariant=chunk_invariant)[0]
        done += m
    return out


def test_chunk_invariant_outputs_do_not_depend_on_the_schedule():
    """One prompt prefilled at once, in three chunks, or partly decoded token by token:
    with chunk-invariant reads every row reads the same K/V values, so the outputs agree
    to rounding (the programs' shapes differ); without, rows past a block filled in their
    own step read it unquantized and differ by the quantization error."""
    def spread(x, y):
        return ((x.float() - y.float()).abs().max() / y.float().abs().max()).item()

    schedules = ([160], [50, 70, 40], [130] + [1] * 3 + [27])
    invariant = [_serve(s, True) for s in schedules]
    plain = [_serve(s, False) for s in schedules]
    for other in invariant[1:]:
        assert spread(other, invariant[0]) < 1e-3
    assert max(spread(other, plain[0]) for other in plain[1:]) > 2e-2
    assert spread(plain[2][130: 133], invariant[0][130: 133]) < 1e-3  # decode rows agree


def test_empty_sequence_gives_zeros():
    cache, bt, sl = build_cache(lens=(70, 64))
    sl = sl.clone()
    sl[1] = 0
    q = torch.randn(2, 1, 4, 64).half().to(DEVICE)
    for splits in (1, 2):
        out = triton_attention.attention(q, cache, bt, sl, splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_num_splits_only_when_short_of_programs():
    assert triton_attention.num_splits(16 * 8, 256, 132) > 1
    assert triton_attention.num_splits(64 * 8, 256, 132) == 1
    assert triton_attention.num_splits(1, 1, 132) == 1  # one tile: nothing to split
    assert triton_attention.num_splits(1, 3, 132) == 3  # a tile per split: 3 programs
    # 1 x 4K and 2 x 4K at 8 KV heads: a tile per split while that is <= 2 programs per SM
    assert triton_attention.num_splits(8, 32, 132) == 32
    assert triton_attention.num_splits(16, 32, 132) == 16
    # at most MAX_SPLITS, or the power of two of them that one wave of 2 programs per SM
    # holds: 8 KV heads at batch 1 -> 32 (264 / 8 = 33), 3 -> 64 (88), 2 -> 128 (132)
    assert triton_attention.num_splits(8, 1024, 132) == 32
    assert triton_attention.num_splits(3, 1024, 132) == 64
    assert triton_attention.num_splits(2, 10_000, 132) == 128
    assert triton_attention.num_splits(3, 96, 132) == 48  # at least 2 tiles per split


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset,d", [("kvarn_k4v2_g128", 128), ("kvarn_k4v4_g64", 256),
                                      ("kvarn_k2v2_g128", 64)])
def test_gpu_long_ragged_batch(preset, d, dtype):
    """Compiled kernel, realistic sizes: 8 KV heads x GQA 4, contexts up to 5000 tokens."""
    cache, bt, sl = build_cache(preset=preset, d=d, hk=8, dtype=dtype, lens=(5000, 1, 777, 2049))
    for splits in (None, 1, 7):
        check_attention(cache, bt, sl, hq=32, splits=splits)
    check_attention(cache, bt, sl, hq=32, sq=5, query_lens=(5, 1, 3, 5))
    check_attention(cache, bt, sl, hq=32, sq=5, query_lens=(5, 1, 3, 5), causal=False, splits=3)


# ---------------------------------------------------------------- cache rules


def _one_sequence(lens, *, pool_slots=8, preset="kvarn_k4v2_g64", sink_blocks=1):
    cache = kc.init(8, 1, 64, pool_slots=pool_slots, preset=preset, sink_blocks=sink_blocks,
                    device=DEVICE)
    bt = torch.tensor([[5, 2, 7, 0, -1]], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(lens, 1, 64, generator=gen).half().to(DEVICE) for _ in range(2))
    kc.append(cache, k, v, slot_mapping(bt.cpu(), 0, 0, lens, 64).to(DEVICE), impl="reference")
    return cache, bt


def test_append_allocates_slots_in_order_of_first_appearance():
    cache = kc.init(10, 1, 64, pool_slots=4, preset="kvarn_k4v2_g64", device=DEVICE)
    cache.slot_to_block[1] = 9  # slot 1 taken
    cache.block_to_slot[9] = 1
    sm = torch.tensor([7 * 64, 7 * 64 + 1, -1, 2 * 64, 9 * 64 + 5, 4 * 64], device=DEVICE)
    kv = torch.randn(6, 1, 64).half().to(DEVICE)
    kc.append(cache, kv, kv, sm, impl="reference")
    assert cache.slot_to_block.tolist() == [7, 9, 2, 4]
    assert [cache.block_to_slot[b].item() for b in (7, 9, 2, 4)] == [0, 1, 2, 3]
    rot = codec.rotate(kv, impl="reference")
    assert torch.equal(cache.pool_k[0, 0:2, 0], rot[0:2, 0])
    assert torch.equal(cache.pool_v[1, 5, 0], rot[4, 0])
    assert int(cache.dropped_tokens) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hk,d", [(3, 64), (1, 256)])
def test_write_kernel_is_the_reference_byte_for_byte(dtype, hk, d):
    """The fused Triton write (one launch) against the torch reference: pool bytes and
    dropped count, for runs opening blocks, runs mid-block, padding, blocks without a slot
    (opened: counted; mid-block: a recomputed token, not counted) and adversarial values."""
    g = 64
    caches = [kc.init(16, hk, d, pool_slots=3, dtype=dtype, preset="kvarn_k4v2_g64",
                      device=DEVICE) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    for step in ([(2, 0, 10)], [(2, 10, 15), None, (5, 0, 4), (7, 0, 3), (9, 5, 7), None,
                                (11, 0, 2)]):
        sm = torch.cat([torch.tensor([-1]) if run is None else
                        torch.arange(run[1], run[2]) + run[0] * g for run in step])
        k, v = (kv_like(gen, sm.shape[0], hk, d) for _ in range(2))
        k[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -1e6, -0.0])
        v[-1, -1, :3] = torch.tensor([1e-35, -float("inf"), 7e4])
        for cache, impl in zip(caches, ("reference", "triton")):
            kc.allocate(cache, sm.to(DEVICE))
            kc.write(cache, k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), sm.to(DEVICE),
                     impl=impl)
    ref, fused = caches
    assert in_pool(ref) == in_pool(fused) == {2, 5, 7}
    assert int(ref.dropped_tokens) == int(fused.dropped_tokens) == 2  # block 11
    for a, b in ((ref.pool_k, fused.pool_k), (ref.pool_v, fused.pool_v)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert ref.pool_k.view(torch.int16).any()


def test_commit_waits_until_every_token_of_a_block_is_accepted():
    cache, bt = _one_sequence(150)  # blocks 5 (sink), 2 (full), 7 (partial)
    sl = torch.tensor([150], device=DEVICE)
    # 30 speculative tokens this step: block 2 (positions 64..127) holds unaccepted ones
    kc.commit(cache, bt, sl, torch.tensor([30], device=DEVICE), impl="reference")
    assert in_pool(cache) == {5, 2, 7}
    kc.commit(cache, bt, sl, torch.tensor([22], device=DEVICE), impl="reference")  # 128 accepted
    assert in_pool(cache) == {5, 7}  # block 2 quantized, the sink stays
    assert cache.block_to_slot[2] == -1 and cache.pages[2].any()
    assert not cache.pages[5].any() and not cache.pages[7].any()


def test_sink_block_stays_in_pool():
    cache, bt = _one_sequence(192, sink_blocks=2)
    kc.commit(cache, bt, torch.tensor([193], device=DEVICE), torch.tensor([1], device=DEVICE),
              impl="reference")
    assert in_pool(cache) == {5, 2}  # sinks 5 and 2; block 7 quantized
    assert cache.pages[7].any()


def test_commit_writes_the_codec_records_of_the_pool_tiles():
    cache, bt = _one_sequence(150)
    tile_k = cache.pool_k[int(cache.block_to_slot[2])].transpose(0, 1).clone()  # [1, G, D]
    tile_v = cache.pool_v[int(cache.block_to_slot[2])].transpose(0, 1).clone()
    kc.commit(cache, bt, torch.tensor([150], device=DEVICE), torch.tensor([1], device=DEVICE),
              impl="reference")
    want = codec.quantize(tile_k, tile_v, cache.preset, impl="reference")
    assert torch.equal(cache.pages[2], want)
    k, v = kc.gather_kv(cache, bt, 3)  # the quantized block reads back dequantized
    deq_k, deq_v = codec.dequantize(want, cache.preset, 64)
    assert torch.equal(k[0, 64:128, 0], deq_k[0]) and torch.equal(v[0, 64:128, 0], deq_v[0])
    assert torch.equal(k[0, :64, 0], cache.pool_k[int(cache.block_to_slot[5]), :, 0].float())


def test_release_quantizes_full_blocks_and_drops_partial_ones():
    cache, bt = _one_sequence(150)
    kc.release(cache, bt, torch.tensor([150], device=DEVICE), impl="reference")
    assert in_pool(cache) == set() and (cache.block_to_slot < 0).all()
    assert cache.pages[5].any() and cache.pages[2].any()  # full blocks, the sink too
    assert not cache.pages[7].any()  # the partial block is dropped, never quantized


def test_pool_exhaustion_counts_dropped_tokens():
    cache, bt = _one_sequence(150, pool_slots=2)  # 3 blocks, 2 slots
    assert in_pool(cache) == {5, 2}
    assert int(cache.dropped_tokens) == 150 - 128  # block 7's tokens found no slot
    kc.append(cache, torch.zeros(1, 1, 64, dtype=torch.float16, device=DEVICE),
              torch.zeros(1, 1, 64, dtype=torch.float16, device=DEVICE),
              torch.tensor([7 * 64 + 22], device=DEVICE), impl="reference")
    # A later write into the middle of a block without a slot looks like a recomputed
    # token of a quantized block and is not counted again; the loss was already counted.
    assert int(cache.dropped_tokens) == 150 - 128
    kc.append(cache, torch.zeros(1, 1, 64, dtype=torch.float16, device=DEVICE),
              torch.zeros(1, 1, 64, dtype=torch.float16, device=DEVICE),
              torch.tensor([3 * 64], device=DEVICE), impl="reference")
    assert int(cache.dropped_tokens) == 150 - 128 + 1  # a new block finds no slot


def test_max_tiles_defers_the_rest_and_matches_an_unbounded_commit():
    lens = 260
    a, bt = _one_sequence(lens)
    b, _ = _one_sequence(lens)
    sl, ql = torch.tensor([lens], device=DEVICE), torch.tensor([1], device=DEVICE)
    kc.commit(a, bt, sl, ql, impl="reference")  # blocks 2, 7, 0 at once (one host sync)
    kc.commit(b, bt, sl, ql, max_tiles=2, impl="reference")  # two now (no host sync) ...
    assert len(in_pool(b)) == len(in_pool(a)) + 1
    kc.commit(b, bt, sl, ql, max_tiles=2, impl="reference")  # ... and the last one, padded
    for name in ("pages", "pool_k", "pool_v", "block_to_slot", "slot_to_block"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flush_of_all_layers_in_one_launch_is_the_reference_byte_for_byte(dtype, monkeypatch):
    """The Triton flush (every layer's tiles gathered in one launch, the records scattered
    in one) against the torch ops, for three layers sharing slot tables: pages, pools and
    tables byte-identical, with max_tiles above the ready count (padding, never written)
    and a layer of another shape (served by the torch ops)."""
    def layers(d_last):
        out = []
        for d in (64, 64, d_last):
            c = kc.init(8, 2, d, pool_slots=6, dtype=dtype, preset="kvarn_k4v2_g64",
                        device=DEVICE)
            if out:
                c = dataclasses.replace(c, block_to_slot=out[0].block_to_slot,
                                        slot_to_block=out[0].slot_to_block,
                                        dropped_tokens=out[0].dropped_tokens)
            out.append(c)
        return out

    launches = []
    gather = triton_tiles.gather_tiles
    monkeypatch.setattr(triton_tiles, "gather_tiles", lambda *a: launches.append(1) or gather(*a))
    bt = torch.tensor([[5, 2, 7, 0, -1]], dtype=torch.int32, device=DEVICE)
    sm = slot_mapping(bt.cpu(), 0, 0, 260, 64).to(DEVICE)
    for d_last in (64, 128):
        runs = []
        for impl in ("reference", "triton"):
            caches = layers(d_last)
            gen = torch.Generator().manual_seed(5)
            kc.allocate(caches[0], sm)
            for c in caches:
                k, v = (kv_like(gen, 260, 2, c.head_dim).to(dtype).to(DEVICE) for _ in range(2))
                kc.write(c, k, v, sm, impl="reference")
            ready = kc.commit_marks(caches[0], bt, torch.tensor([260], device=DEVICE),
                                    torch.tensor([1], device=DEVICE))  # blocks 2, 7, 0
            kc.flush(caches, ready, torch.zeros_like(ready), max_tiles=5, impl=impl)
            runs.append(caches)
        for ref, got in zip(*runs):
            assert in_pool(ref) == in_pool(got) == {5}
            for name in ("pages", "pool_k", "pool_v", "block_to_slot", "slot_to_block"):
                assert torch.equal(getattr(ref, name), getattr(got, name)), name
            assert all(ref.pages[b].any() for b in (2, 7, 0))
            assert not ref.pages[5].any() and not ref.pages[1].any()
    assert len(launches) == 2  # K and V of the uniform layers; the mixed ones took torch ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_of_cache_bookkeeping_never_waits_for_the_gpu():
    """What vLLM's metadata builder and layers run every step (commit and release marks,
    flushes bounded by max_tiles, allocate, write) makes no host sync: one would stall
    vLLM's overlap of CPU and GPU work (an index assignment in `_mark` did, a sync per
    step: 0.26 s of GPU idle in an H200's 64 x 1K burst)."""
    def step(cache, bt, check):
        sl, ql = torch.tensor([193], device=DEVICE), torch.tensor([1], device=DEVICE)
        sm = torch.tensor([0], device=DEVICE)  # the decode token opens block 0
        kv = torch.ones(1, 1, 64, dtype=torch.float16, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            ready = kc.commit_marks(cache, bt, sl, ql)
            kc.flush(cache, ready, torch.zeros_like(ready), max_tiles=2)
            kc.allocate(cache, sm)
            kc.write(cache, kv, kv, sm)
            full, partial = kc.release_marks(cache, bt, sl)
            kc.flush(cache, full, partial, max_tiles=2)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    step(*_one_sequence(192), check=False)  # compiles the kernels outside the check
    cache, bt = _one_sequence(192)  # blocks 5 (sink), 2 and 7 full
    step(cache, bt, check=True)
    assert in_pool(cache) == set() and int(cache.dropped_tokens) == 0
    assert all(cache.pages[b].any() for b in (5, 2, 7)) and not cache.pages[0].any()


# ---------------------------------------------------------------- byte identity with JAX


def _to_jax(x: torch.Tensor):
    x = x.cpu()
    if x.dtype == torch.bfloat16:
        return jnp.asarray(x.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return jnp.asarray(x.numpy())


def _assert_same_state(tc, jc, step: str):
    for name in ("pages", "pool_k", "pool_v", "block_to_slot", "slot_to_block"):
        t = getattr(tc, name).cpu()
        t = t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t
        j = np.asarray(getattr(jc, name))
        j = j.view(np.int16) if j.dtype.itemsize == 2 and name.startswith("pool") else j
        assert np.array_equal(t.numpy(), j), f"{name} differs after {step}"
    assert int(tc.dropped_tokens) == int(jc.dropped_tokens), f"dropped_tokens after {step}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_bytes_identical_to_jax(dtype):
    with jax.default_device(jax.devices("cpu")[0]):  # the exact CPU path, also on a GPU host
        _cache_bytes_identical_to_jax(dtype)


def _cache_bytes_identical_to_jax(dtype):
    preset, hk, d, g = "kvarn_k4v2_g64", 2, 64, 64
    tc = kc.init(12, hk, d, pool_slots=5, dtype=dtype, preset=preset, device="cpu")
    jc = jcache.init(12, hk, d, pool_slots=5, dtype=jnp.dtype(str(dtype)[6:]), preset=preset)
    bt = torch.tensor([[7, 2, 9, 11], [5, 0, 3, -1]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(7)

    def append(chunks):  # chunks: (seq, start, stop) in batch order, plus 2 padding tokens
        padding = -torch.ones(2, dtype=torch.long)
        sm = torch.cat([slot_mapping(bt, i, a, z, g) for i, a, z in chunks] + [padding])
        k, v = (kv_like(gen, sm.shape[0], hk, d).to(dtype) for _ in range(2))
        kc.append(tc, k, v, sm, impl="reference")
        return jcache.append(jc, _to_jax(k), _to_jax(v), jnp.asarray(sm.numpy(), jnp.int32),
                             impl="reference")

    def commit(jc, lens, qlens, **kw):
        sl, ql = torch.tensor(lens, dtype=torch.int32), torch.tensor(qlens, dtype=torch.int32)
        kc.commit(tc, bt, sl, ql, impl="reference", **kw)
        return jcache.commit(jc, _to_jax(bt), _to_jax(sl), _to_jax(ql), impl="reference", **kw)

    jc = append([(0, 0, 100), (1, 0, 70)])  # prefill both
    _assert_same_state(tc, jc, "prefill")
    jc = commit(jc, [100, 70], [100, 70])
    _assert_same_state(tc, jc, "commit after prefill")
    jc = append([(0, 100, 140), (1, 70, 130)])  # chunks: 6 blocks want 5 slots, one drops
    jc = commit(jc, [140, 130], [40, 60])  # nothing fully accepted past the sinks yet
    _assert_same_state(tc, jc, "chunk")
    blocks = torch.tensor([2, 0, -1, 9], dtype=torch.int32)  # full, full, none, partial
    kc.snapshot(tc, blocks, impl="reference")
    jc = jcache.snapshot(jc, _to_jax(blocks), impl="reference")
    _assert_same_state(tc, jc, "snapshot")
    jc = append([(0, 140, 141), (1, 130, 131)])
    jc = commit(jc, [141, 131], [1, 1], max_tiles=1)  # one of two ready blocks
    _assert_same_state(tc, jc, "commit max_tiles=1")
    jc = commit(jc, [141, 131], [1, 1])
    _assert_same_state(tc, jc, "commit")
    kc.release(tc, bt[:1], torch.tensor([141], dtype=torch.int32), impl="reference")
    jc = jcache.release(jc, _to_jax(bt[:1]), jnp.asarray([141], jnp.int32), impl="reference")
    _assert_same_state(tc, jc, "release")
    assert int(tc.dropped_tokens) > 0  # the scenario did exhaust the pool
    for window in ((None, None), (1, 2)):  # every block as attention reads it; records 1..2
        k_t, v_t = kc.gather_kv(tc, bt[1:], 3, *window)
        k_j, v_j = jcache.gather_kv(jc, _to_jax(bt[1:]), 3, *window)
        assert np.array_equal(k_t.numpy(), np.asarray(k_j))
        assert np.array_equal(v_t.numpy(), np.asarray(v_j))


@pytest.mark.parametrize("preset,d,dtype,impl", [
    ("kvarn_k4v2_g64", 64, torch.float16, "auto"),
    ("kvarn_k4v2_g64", 64, torch.bfloat16, "auto"),
    ("kvarn_k4v4_g128", 128, torch.float16, "auto"),
    ("kvarn_k4v4_g128", 128, torch.bfloat16, "auto"),
    ("kvarn_k4v2_g64", 64, torch.bfloat16, "triton"),  # the interpreter on a CPU
])
def test_write_blocks_gives_the_records_of_append_and_commit(preset, d, dtype, impl):
    """Blocks written straight from a step's tokens (`write_blocks`: prompt blocks that
    need no pool slot) hold byte for byte the records that writing the tokens into the
    pool and committing them gives, on random and adversarial tiles, in torch ("auto":
    on a GPU the kernels vLLM runs), in Triton's kernels and in JAX."""
    from kvarn.tiles import adversarial_tiles

    hk = 2
    g = get_preset(preset).tile
    tiles = [torch.from_numpy(t.astype(np.float32))
             for t in adversarial_tiles(g, d, "float16").values()]
    gen = torch.Generator().manual_seed(11)
    tiles += [3 * torch.randn(g, d, generator=gen) for _ in range(3)]
    tiles = torch.stack(tiles[: 2 * (len(tiles) // 2)]).view(-1, 2, g, d)  # two heads a block
    n = tiles.shape[0]
    k = tiles.transpose(1, 2).reshape(n * g, hk, d).to(dtype)
    v = k.roll(1, dims=0)
    pad = 5  # tokens of other requests before the blocks
    k, v = (torch.cat([torch.randn(pad, hk, d, generator=gen).to(dtype), x]) for x in (k, v))
    k, v = k.to(DEVICE), v.to(DEVICE)
    blocks = torch.randperm(n + 3, generator=gen)[:n].to(torch.int32).to(DEVICE)

    pooled = kc.init(n + 3, hk, d, pool_slots=n, dtype=dtype, preset=preset, sink_blocks=0,
                     device=DEVICE)
    sm = torch.cat([torch.full((pad,), -1), (blocks.long().cpu()[:, None] * g
                                               + torch.arange(g)).flatten()]).to(DEVICE)
    kc.append(pooled, k, v, sm, impl=impl)
    lens = torch.full((n,), g, dtype=torch.int32, device=DEVICE)
    kc.commit(pooled, blocks[:, None], lens, torch.zeros_like(lens), impl=impl)
    assert int(pooled.block_to_slot.max()) == -1  # every block committed

    direct = kc.init(n + 3, hk, d, pool_slots=1, dtype=dtype, preset=preset, device=DEVICE)
    starts = pad + g * torch.arange(n, device=DEVICE)
    kc.write_blocks(direct, k, v, starts, blocks, impl=impl)
    assert torch.equal(direct.pages, pooled.pages)
    assert int(direct.slot_to_block.max()) == -1 and int(direct.dropped_tokens) == 0

    # JAX on its default device, so that a GPU host checks the compiled Pallas kernels
    jc = jcache.init(n + 3, hk, d, pool_slots=1, dtype=jnp.dtype(str(dtype)[6:]),
                     preset=preset)
    jc = jcache.write_blocks(jc, _to_jax(k), _to_jax(v), _to_jax(starts), _to_jax(blocks))
    assert np.array_equal(np.asarray(jc.pages), pooled.pages.cpu().numpy())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset,d,state", [("kvarn_k4v2_g64", 64, "mixed"),
                                            ("kvarn_k2v2_g128", 128, "quantized"),
                                            ("kvarn_k4v4_g64", 128, "pool")])
def test_gather_dense_matches_the_reference(preset, d, state, dtype):
    cache, bt, sl = build_cache(preset=preset, d=d, dtype=dtype, lens=(300,), state=state)
    n = -(-300 // cache.tile)
    got_k, got_v = triton_gather.gather(cache, bt[0], n)
    want_k, want_v = triton_gather.gather_reference(cache, bt[0], n)
    assert got_k.shape == (n * cache.tile, cache.num_kv_heads, d) and got_k.dtype == dtype
    for got, want in ((got_k, want_k), (got_v, want_v)):
        # the oracle's float32 values rounded once to the model dtype: equal, but for the
        # interpreter's float32 -> bf16 truncation (one bf16 ulp)
        if dtype == torch.float16 or torch.cuda.is_available():
            assert torch.equal(got, want.to(dtype))
        else:
            err = (got.float() - want.to(dtype).float()).abs() / want.abs().clamp(min=1e-30)
            assert err.max() <= 2.0 ** -7, f"max relative difference {err.max():.2e}"


def test_gather_records_from_reads_snapshots_of_pool_blocks():
    cache, bt, sl = build_cache(lens=(300,), state="pool")
    _snapshot_full_blocks(cache, bt, sl)
    n = 300 // cache.tile  # the full blocks: 4 of 64 tokens
    got = triton_gather.gather(cache, bt[0], n, records_from=1)
    want = triton_gather.gather_reference(cache, bt[0], n, records_from=1)
    raw = triton_gather.gather(cache, bt[0], n)
    g = cache.tile
    for x, w, r in zip(got, want, raw):
        assert torch.equal(x, w.to(x.dtype))
        assert torch.equal(x[:g], r[:g])  # the sink, as stored
        assert not torch.equal(x[g:], r[g:])


def test_gather_reads_a_block_listed_twice_from_its_record_and_as_stored():
    """records_from .. records_to: the pages of chunk-invariant prompt rows in one launch,
    the records of the earlier blocks, then the rows' own blocks as stored."""
    cache, bt, sl = build_cache(lens=(300,), state="pool")
    _snapshot_full_blocks(cache, bt, sl)
    n, g = 300 // cache.tile, cache.tile  # 4 full blocks of 64 tokens, then a partial one
    table = torch.cat([bt[0, :n], bt[0, 1: n + 1]])
    got = triton_gather.gather(cache, table, 2 * n, records_from=1, records_to=n)
    want = triton_gather.gather_reference(cache, table, 2 * n, records_from=1, records_to=n)
    records = triton_gather.gather(cache, bt[0], n, records_from=1)
    stored = triton_gather.gather(cache, bt[0], n + 1)
    for x, w, r, p in zip(got, want, records, stored):
        assert torch.equal(x, w.to(x.dtype))
        assert torch.equal(x[: n * g], r) and torch.equal(x[n * g:], p[g:])


def test_gather_errors_name_the_fix():
    cache, bt, _ = build_cache(lens=(100,))
    with pytest.raises(ValueError, match="1-D int32/int64"):
        triton_gather.gather(cache, bt, 1)
    with pytest.raises(ValueError, match=r"num_blocks must be in \[0, "):
        triton_gather.gather(cache, bt[0], bt.shape[1] + 1)


def test_errors_name_the_fix():
    cache, bt, sl = build_cache(lens=(70,), hk=2)
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16, device=DEVICE)
    attention = triton_attention.attention
    with pytest.raises(ValueError, match="multiple of"):
        attention(torch.zeros(1, 1, 3, 64, dtype=torch.float16, device=DEVICE), cache, bt, sl)
    with pytest.raises(ValueError, match=r"\[B, Sq >= 1, Hq, 64\]"):
        attention(torch.zeros(1, 1, 4, 128, dtype=torch.float16, device=DEVICE), cache, bt, sl)
    with pytest.raises(ValueError, match=r"\[B, Sq, Hq, D\]"):
        attention(q[0], cache, bt, sl)
    with pytest.raises(TypeError, match="cast q"):
        attention(q.bfloat16(), cache, bt, sl)
    with pytest.raises(ValueError, match="block_tables"):
        attention(q, cache, bt[0], sl)
    with pytest.raises(ValueError, match="seq_lens"):
        attention(q, cache, bt, sl[:0])
    with pytest.raises(TypeError, match="int32 or int64"):
        attention(q, cache, bt, sl.float())
    with pytest.raises(ValueError, match="block_n"):
        attention(q, cache, bt, sl, block_n=48)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        attention(q, cache, bt, sl, rows=24)
    with pytest.raises(ValueError, match=r"num_warps must be <= 4 at head_dim 64"):
        attention(q, cache, bt, sl, num_warps=8)  # 64 tile rows: one warpgroup
    strided = dataclasses.replace(cache, pool_v=cache.pool_v.transpose(1, 2).contiguous()
                                  .transpose(1, 2))
    with pytest.raises(ValueError, match="pool_k and pool_v must have the same strides"):
        attention(q, strided, bt, sl)
    with pytest.raises(ValueError, match="splits"):
        attention(q, cache, bt, sl, splits=0)
    with pytest.raises(ValueError, match=r"k and v must be \[T, 2, 64\]"):
        kc.append(cache, q[0], q[0], torch.zeros(1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv = torch.zeros(2, 2, 64, dtype=torch.float16, device=DEVICE)
        kc.append(cache, kv, kv, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="index tensors must be integers"):
        kc.append(cache, kv, kv, torch.zeros(2, device=DEVICE))
    starts = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="of one length"):
        kc.write_blocks(cache, kv, kv, starts, starts[:0])
    with pytest.raises(TypeError, match="pool's dtype"):
        kc.write_blocks(cache, kv.bfloat16(), kv.bfloat16(), starts, starts)
    with pytest.raises(ValueError, match="seq_lens / query_lens"):
        kc.commit(cache, bt, sl, sl[:0])
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        kc.init(4, 1, 64, pool_slots=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        kc.init(4, 1, 96, pool_slots=2)
    with pytest.raises(ValueError, match="unknown KVarN preset"):
        kc.init(4, 1, 64, pool_slots=2, preset="kvarn_k3v3_g128")
    assert layout(cache.preset, 64).record_bytes == cache.pages.shape[2]


def test_recomputed_token_of_a_quantized_block_keeps_the_record():
    """A prefix hit over a whole prompt makes vLLM recompute the last token into a block
    that is already quantized: no slot is taken, nothing counts as lost, and the record
    stays what attention reads."""
    c = kc.init(8, 2, 64, pool_slots=4, preset="kvarn_k4v2_g64", device=DEVICE)
    table = torch.tensor([[1, 2]], dtype=torch.int32, device=DEVICE)
    k = torch.randn(128, 2, 64).half().to(DEVICE)
    sm = torch.cat([torch.arange(64) + 64, torch.arange(64) + 128]).to(DEVICE)
    kc.append(c, k, k, sm)
    kc.commit(c, table, torch.tensor([129], device=DEVICE), torch.tensor([1], device=DEVICE))  # block 2 quantized
    record = c.pages[2].clone()
    kc.append(c, k[-1:], k[-1:], torch.tensor([2 * 64 + 63], device=DEVICE))
    assert int(c.block_to_slot[2]) == -1 and int(c.dropped_tokens) == 0
    assert torch.equal(c.pages[2], record)


@pytest.mark.parametrize("head_dim, tile, n_rows, want", [
    (128, 128, 4, (16, 128, 4)),
    (128, 128, 32, (32, 128, 8)),  # two warpgroups of 64 tile rows
    (64, 64, 32, (32, 64, 4)),  # 64 tile rows: one warpgroup
    (64, 128, 32, (32, 128, 4)),  # the V dot has head_dim = 64 rows
    (256, 64, 4, (16, 64, 4)),
])
def test_launch_config_gives_each_warpgroup_64_tile_rows(head_dim, tile, n_rows, want):
    rows, block_n, warps = triton_attention.launch_config(head_dim, tile, n_rows)
    assert (rows, block_n, warps) == want
    assert warps <= triton_attention.max_warps(head_dim, block_n)
