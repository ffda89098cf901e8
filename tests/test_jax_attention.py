"""The JAX paged cache (commit/sink/release rules) and attention over it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvarn_jax  # noqa: F401
from kvarn import oracle
from kvarn.format import layout
from kvarn_jax import attention_reference, cache, pallas_attention, reference

G, D = 64, 64
PRESET = "kvarn_k4v2_g64"


def slot_mapping(table, start, n, g=G):
    pos = np.arange(start, start + n)
    return (np.asarray(table)[pos // g] * g + pos % g).astype(np.int32)


class Sequences:
    """A tiny scheduler: sequences with block tables, appending tokens step by step."""

    def __init__(self, tables, hk=2, dtype=np.float16, seed=0, d=D, num_blocks=32, **cache_kw):
        kw = dict(pool_slots=8, preset=PRESET, dtype=dtype) | cache_kw
        self.cache = cache.init(num_blocks, hk, d, **kw)
        self.g = self.cache.tile
        self.tables = np.array(tables, np.int32)
        self.lens = np.zeros(len(tables), np.int32)
        self.rng = np.random.default_rng(seed)
        self.k = [np.zeros((0, hk, d), dtype) for _ in tables]
        self.v = [np.zeros((0, hk, d), dtype) for _ in tables]
        self.hk, self.dtype = hk, dtype

    def step(self, counts, commit=True, impl="auto"):
        """Append counts[b] tokens to each sequence, then commit as a scheduler would."""
        ks, vs, maps = [], [], []
        for b, n in enumerate(counts):
            k = self.rng.standard_normal((n, self.hk, self.cache.head_dim)).astype(self.dtype)
            v = self.rng.standard_normal((n, self.hk, self.cache.head_dim)).astype(self.dtype)
            ks.append(k), vs.append(v)
            maps.append(slot_mapping(self.tables[b], self.lens[b], n, self.g))
            self.k[b] = np.concatenate([self.k[b], k])
            self.v[b] = np.concatenate([self.v[b], v])
        self.lens = self.lens + np.array(counts, np.int32)
        self.cache = cache.append(self.cache, jnp.asarray(np.concatenate(ks)),
                                  jnp.asarray(np.concatenate(vs)),
                                  jnp.asarray(np.concatenate(maps)), impl=impl)
        if commit:
            self.cache = cache.commit(self.cache, jnp.asarray(self.tables), jnp.asarray(self.lens),
                                      jnp.asarray(counts, jnp.int32), impl=impl)

    def slot(self, b, j):
        return int(self.cache.block_to_slot[self.tables[b, j]])


def test_prefill_is_not_committed_until_the_next_step_and_the_sink_stays():
    s = Sequences([[3, 5, 7, -1]])
    s.step([150])  # prefill: no token was accepted before this step
    assert all(s.slot(0, j) >= 0 for j in range(3))
    s.step([1])  # decode: the prompt is now accepted
    assert s.slot(0, 0) >= 0, "sink block left the pool"
    assert s.slot(0, 1) == -1, "full, accepted block was not quantized"
    assert s.slot(0, 2) >= 0, "partial block was quantized"


def test_records_written_by_commit_are_the_oracle_bytes():
    s = Sequences([[3, 5, 7, -1]], dtype=jnp.bfloat16, seed=1)
    s.step([150])
    s.step([1])
    blk = s.tables[0, 1]
    k = np.swapaxes(s.k[0][G:2 * G], 0, 1)  # [Hk, G, D]
    v = np.swapaxes(s.v[0][G:2 * G], 0, 1)
    want = oracle.quantize(oracle.rotate(k), oracle.rotate(v), PRESET)
    np.testing.assert_array_equal(np.asarray(s.cache.pages[blk]), want)


def test_a_block_with_unaccepted_tokens_is_never_quantized():
    s = Sequences([[3, 5, 7, -1]])
    s.step([120])
    # Speculative verify: 8 new tokens (1 + 7 drafts) complete block 1 at 128 tokens,
    # but none of them is accepted yet.
    s.step([8])
    assert s.slot(0, 1) >= 0
    s.step([1])  # the next step: the 8 tokens were accepted
    assert s.slot(0, 1) == -1


def test_without_sink_block_zero_is_quantized():
    s = Sequences([[3, 5, -1, -1]], sink_blocks=0)
    s.step([100])
    s.step([1])
    assert s.slot(0, 0) == -1 and s.slot(0, 1) >= 0


def test_release_quantizes_full_blocks_drops_partial_ones_and_frees_slots():
    s = Sequences([[3, 5, 7, -1], [1, 9, -1, -1]])
    s.step([150, 70])
    s.step([1, 1])
    s.cache = cache.release(s.cache, jnp.asarray(s.tables[1:]), jnp.asarray(s.lens[1:]),
                            impl="auto")
    assert s.slot(1, 0) == -1 and s.slot(1, 1) == -1
    assert int(jnp.sum(s.cache.slot_to_block >= 0)) == 2  # sequence 0: sink + tail
    k = np.swapaxes(s.k[1][:G], 0, 1)
    v = np.swapaxes(s.v[1][:G], 0, 1)
    want = oracle.quantize(oracle.rotate(k), oracle.rotate(v), PRESET)
    np.testing.assert_array_equal(np.asarray(s.cache.pages[1]), want)


def test_recycled_block_gets_a_fresh_slot_and_record():
    s = Sequences([[3, 5, -1, -1]])
    s.step([130])
    s.step([1])
    s.cache = cache.release(s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens), impl="auto")
    assert int(jnp.sum(s.cache.slot_to_block >= 0)) == 0
    s2 = Sequences([[5, 3, -1, -1]], seed=7)  # the same physical blocks, another sequence
    s2.cache = s.cache
    s2.step([140])
    s2.step([1])
    k = np.swapaxes(s2.k[0][G:2 * G], 0, 1)
    v = np.swapaxes(s2.v[0][G:2 * G], 0, 1)
    want = oracle.quantize(oracle.rotate(k), oracle.rotate(v), PRESET)
    np.testing.assert_array_equal(np.asarray(s2.cache.pages[3]), want)


def test_max_tiles_defers_the_rest_to_the_next_commit():
    s = Sequences([[3, 5, 7, 9]], pool_slots=6)
    s.step([256], commit=False)
    args = (jnp.asarray(s.tables), jnp.asarray(s.lens), jnp.zeros((1,), jnp.int32))
    s.cache = cache.commit(s.cache, *args, max_tiles=1, impl="auto")
    assert [s.slot(0, j) >= 0 for j in range(4)] == [True, False, True, True]
    s.cache = cache.commit(s.cache, *args, max_tiles=1, impl="auto")
    assert [s.slot(0, j) >= 0 for j in range(4)] == [True, False, False, True]


def test_pool_exhaustion_counts_dropped_tokens():
    s = Sequences([[3, 5, 7, -1]], pool_slots=2)
    s.step([150], commit=False)
    assert int(s.cache.dropped_tokens) == 150 - 2 * G


def test_init_errors():
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        cache.init(4, 2, 64, pool_slots=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="64, 128, 256"):
        cache.init(4, 2, 96, pool_slots=2)


def test_write_blocks_errors():
    c = cache.init(4, 2, 64, pool_slots=2)
    kv = jnp.zeros((64, 2, 64), jnp.float16)
    starts = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="1-D integer arrays of one length"):
        cache.write_blocks(c, kv, kv, starts.astype(jnp.float32), starts)
    with pytest.raises(TypeError, match="pool's dtype"):
        cache.write_blocks(c, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), starts, starts)
    with pytest.raises(ValueError, match=r"\[T, 2, 64\]"):
        cache.write_blocks(c, kv[:, :1], kv[:, :1], starts, starts)


def dense_attention(q, k, v, limit):
    """q [Hq, D], k/v [T, Hk, D] numpy, positions < limit; exact float64."""
    hq, hk = q.shape[0], k.shape[1]
    out = []
    for h in range(hq):
        kk, vv = k[:limit, h // (hq // hk)].astype(np.float64), v[:limit, h // (hq // hk)]
        s = kk @ q[h].astype(np.float64) / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ vv.astype(np.float64))
    return np.stack(out)


def test_reference_attention_on_pool_blocks_is_exact_attention():
    s = Sequences([[3, 5, -1, -1]], hk=2, seed=3)
    s.step([100])
    q = np.random.default_rng(4).standard_normal((1, 1, 4, D)).astype(np.float32)
    out = attention_reference.attention(jnp.asarray(q), s.cache, jnp.asarray(s.tables),
                                        jnp.asarray(s.lens), jnp.ones((1,), jnp.int32),
                                        max_blocks=4)
    want = dense_attention(q[0, 0], s.k[0], s.v[0], 100)
    np.testing.assert_allclose(np.asarray(out)[0, 0], want, atol=2e-3)


def _kernel_vs_reference(s, q, query_lens, causal, splits, atol):
    args = (s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens))
    got = pallas_attention.attention(jnp.asarray(q), *args, jnp.asarray(query_lens),
                                     causal=causal, splits=splits)
    want = attention_reference.attention(jnp.asarray(q, jnp.float32), *args,
                                         jnp.asarray(query_lens), causal=causal,
                                         max_blocks=s.tables.shape[1])
    assert got.shape == q.shape and got.dtype == q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want)
    for b, n in enumerate(query_lens):  # rows past query_len are padding
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hq", [2, 8])
def test_decode_kernel_mixed_blocks_ragged_lengths(dtype, splits, hq):
    s = Sequences([[3, 5, 7, 11], [1, 9, 13, -1], [2, -1, -1, -1]], dtype=dtype, seed=5)
    s.step([230, 150, 40])  # ragged, pool + quantized blocks after the next step
    s.step([1, 1, 1])
    q = np.random.default_rng(6).standard_normal((3, 1, hq, D)).astype(dtype)
    _kernel_vs_reference(s, q, [1, 1, 1], True, splits, atol=0.03)


def test_decode_kernel_quantized_blocks_only():
    s = Sequences([[3, 5, -1, -1]], sink_blocks=0, seed=8)
    s.step([128])
    s.step([0])
    assert s.slot(0, 0) == -1 and s.slot(0, 1) == -1
    q = np.random.default_rng(9).standard_normal((1, 1, 4, D)).astype(np.float16)
    _kernel_vs_reference(s, q, [1], True, 2, atol=0.03)


@pytest.mark.parametrize("causal", [True, False])
def test_multi_query_rows(causal):
    s = Sequences([[3, 5, 7, -1], [1, 9, -1, -1]], seed=10)
    s.step([140, 60])
    s.step([5, 3], commit=False)  # verify rows: 5 and 3 new tokens, not accepted yet
    q = np.random.default_rng(11).standard_normal((2, 5, 4, D)).astype(np.float16)
    _kernel_vs_reference(s, q, [5, 3], causal, 2, atol=0.03)


def _snapshot_full_blocks(s):
    """Records for every full block past the sinks, the blocks left in the pool."""
    full = [int(b) for i, n in enumerate(s.lens)
            for b in s.tables[i, s.cache.sink_blocks: n // s.g]]
    s.cache = cache.snapshot(s.cache, jnp.asarray(full, jnp.int32))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_chunk_invariant_rows_read_earlier_blocks_from_records(causal, splits):
    """A prefill chunk whose rows span several pool blocks: each row reads the blocks
    before its own (sink excepted) from their records, its own block as stored."""
    s = Sequences([[3, 5, 7, 11], [1, 9, 13, -1]], seed=12, dtype=jnp.bfloat16)
    s.step([200, 150], commit=False)
    _snapshot_full_blocks(s)
    assert s.slot(0, 2) >= 0  # the slot is kept
    q = np.random.default_rng(13).standard_normal((2, 160, 2, D)).astype(jnp.bfloat16)
    args = (s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens), jnp.asarray([160, 100]))
    got = pallas_attention.attention(jnp.asarray(q), *args, causal=causal, splits=splits,
                                     chunk_invariant=True)
    want = attention_reference.attention(jnp.asarray(q, jnp.float32), *args, causal=causal,
                                         max_blocks=4, chunk_invariant=True)
    plain = attention_reference.attention(jnp.asarray(q, jnp.float32), *args, causal=causal,
                                          max_blocks=4)
    got, want, plain = (np.asarray(x, np.float32) for x in (got, want, plain))
    for b, n in enumerate([160, 100]):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=0.06, rtol=0)
        assert np.abs(plain[b, :n] - want[b, :n]).max() > 0.1  # the records differ


def test_chunk_invariant_row_matches_a_committed_context_bit_for_bit():
    """Rows of block 2 whose block 1 was filled in the same step (in the pool, record
    written ahead) give the bits they give once block 1 is committed."""
    s = Sequences([[3, 5, 7, -1]], hk=1, seed=14)
    s.step([170], commit=False)
    _snapshot_full_blocks(s)
    q = jnp.asarray(np.random.default_rng(15).standard_normal((1, 30, 2, D)), jnp.float16)
    args = (jnp.asarray(s.tables), jnp.asarray(s.lens), jnp.asarray([30]))
    same_step = pallas_attention.attention(q, s.cache, *args, chunk_invariant=True)
    s.cache = cache.commit(s.cache, *args)
    assert s.slot(0, 1) == -1 and s.slot(0, 2) >= 0
    later = pallas_attention.attention(q, s.cache, *args, chunk_invariant=True)
    assert np.array_equal(np.asarray(same_step), np.asarray(later))
    assert np.array_equal(np.asarray(later),
                          np.asarray(pallas_attention.attention(q, s.cache, *args, splits=1)))


def test_chunk_invariant_splits_at_fixed_positions(monkeypatch):
    """Chunk-invariant calls split a sequence every INVARIANT_SPLIT_TOKENS tokens whatever
    the batch: the decode row of a position gives the same bits alone and in a wider batch
    with a wider block table, where the default rule splits them differently."""
    monkeypatch.setattr(pallas_attention, "INVARIANT_SPLIT_TOKENS", 128)  # 2 blocks a split
    monkeypatch.setattr(pallas_attention, "_num_sms", lambda: 4)
    s = Sequences([[3, 5, 7, 11, 13, -1], [1, 9, -1, -1, -1, -1]], seed=18)
    s.step([300, 70])
    s.step([1, 1])
    q = jnp.asarray(np.random.default_rng(19).standard_normal((2, 1, 4, D)), jnp.float16)
    tables, lens = jnp.asarray(s.tables), jnp.asarray(s.lens)

    def run(rows, width, invariant=True):
        rows = jnp.asarray(rows)
        return pallas_attention.attention(q[rows], s.cache, tables[rows, :width], lens[rows],
                                          chunk_invariant=invariant)

    alone, batch = run([0], 5), run([1, 0], 6)
    assert np.array_equal(np.asarray(alone[0]), np.asarray(batch[1]))
    assert not np.array_equal(np.asarray(run([0], 5, False)[0]),
                              np.asarray(run([1, 0], 6, False)[1]))


def test_snapshot_writes_the_commit_bytes_and_keeps_slots():
    s = Sequences([[3, 5, 7, -1]], seed=16)
    s.step([170], commit=False)
    with pytest.raises(ValueError, match="1-D integer array of block ids"):
        cache.snapshot(s.cache, jnp.asarray([[5]], jnp.int32))
    s.cache = cache.snapshot(s.cache, jnp.asarray([5, -1, 7], jnp.int32))  # 7: partial
    assert s.slot(0, 1) >= 0 and s.slot(0, 2) >= 0
    snap = np.asarray(s.cache.pages)
    s.cache = cache.commit(s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens),
                           jnp.asarray([0]))
    np.testing.assert_array_equal(snap[5], np.asarray(s.cache.pages)[5])
    assert s.slot(0, 1) == -1


KERNEL_CASES = [
    # preset, head_dim, dtype, KV heads, GQA group, sequence lengths
    ("kvarn_k4v2_g128", 128, jnp.bfloat16, 1, 16, (300, 129)),
    ("kvarn_k4v4_g64", 256, jnp.float16, 1, 1, (130,)),
    ("kvarn_k4v4_g128", 256, jnp.bfloat16, 1, 4, (260,)),
    ("kvarn_k2v2_g128", 128, jnp.float16, 1, 4, (257,)),
    ("kvarn_k4v4_g128", 64, jnp.float16, 2, 8, (260, 5)),
    ("kvarn_k2v2_g64", 64, jnp.bfloat16, 2, 2, (200, 64)),
]


@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=lambda c: f"{c[0]}-d{c[1]}-{jnp.dtype(c[2]).name}-gqa{c[4]}")
def test_decode_kernel_every_preset_head_dim_and_dtype(case):
    preset, d, dtype, hk, group, lens = case
    g = layout(preset, d).preset.tile
    width = max(-(-(n + 1) // g) for n in lens)  # blocks of the longest sequence
    tables = np.arange(len(lens) * width, dtype=np.int32).reshape(len(lens), width)[:, ::-1]
    s = Sequences(tables.copy(), hk=hk, dtype=dtype, d=d, preset=preset, seed=12,
                  num_blocks=tables.size, pool_slots=tables.size)
    s.step(list(lens))
    s.step([1] * len(lens))  # the prompts are accepted: full blocks past the sink quantized
    slots = [s.slot(b, j) for b, n in enumerate(lens) for j in range(-(-(n + 1) // g))]
    assert min(slots) == -1 and max(slots) >= 0, "both kinds of blocks"
    q = np.random.default_rng(13).standard_normal((len(lens), 1, hk * group, d)).astype(dtype)
    for splits in (1, 2):
        _kernel_vs_reference(s, q, [1] * len(lens), True, splits, atol=0.03)


def test_decode_kernel_pool_only_and_more_splits_than_blocks():
    s = Sequences([[3, 5, 7, -1], [1, 9, -1, -1]], seed=14)
    s.step([170, 90], commit=False)  # nothing accepted yet: every block in the pool
    assert all(s.slot(b, j) >= 0 for b, j in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)))
    q = np.random.default_rng(15).standard_normal((2, 1, 4, D)).astype(np.float16)
    for splits in (1, 7, 40):  # 40: the merge loads 64 partials (MAX_WAVE_SPLITS)
        _kernel_vs_reference(s, q, [1, 1], True, splits, atol=0.03)


def test_pool_partials_are_the_pool_blocks_alone():
    """pool_partials (for a kernel that reads the records itself) merged alone: on a cache
    of pool blocks only the whole attention; with records, attention over the pool blocks
    alone, the records' blocks left out."""
    s = Sequences([[3, 5, 7, -1], [1, 9, -1, -1]], seed=20)
    s.step([170, 90])
    args = (s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens))
    q = jnp.asarray(np.random.default_rng(21).standard_normal((2, 1, 4, D)).astype(np.float16))
    o, l, m, q_unit, q_norm = pallas_attention.pool_partials(q, *args)
    pool_only = pallas_attention.merge(o, l, m, q, 1)
    np.testing.assert_array_equal(np.asarray(pool_only),
                                  np.asarray(pallas_attention.attention(q, *args, splits=1)))
    # The record kernel's query rows: q_unit * q_norm = rotated q * scale * log2 e.
    assert q_unit.dtype == jnp.float16 and q_unit.shape == (2, 2, pallas_attention.MIN_ROWS, D)
    assert float(jnp.max(jnp.abs(q_unit))) == 1.0
    want = np.asarray(reference.rotate(q.astype(jnp.float32)))[:, 0].reshape(2, 2, 2, D)
    want = want * (D ** -0.5 * pallas_attention.LOG2E)
    got_q = np.asarray(q_unit, np.float32) * np.asarray(q_norm)[:, :, 0, :, None]
    np.testing.assert_allclose(got_q[:, :, :2], want, rtol=2e-3, atol=1e-6)
    assert not np.any(got_q[:, :, 2:])
    s.step([1, 1])  # the full blocks past the sink are records now
    assert s.slot(0, 1) == -1 and s.slot(0, 0) >= 0
    args = (s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens))
    got = pallas_attention.merge(*pallas_attention.pool_partials(q, *args)[:3], q, 1)
    pool_mask = np.array([[s.slot(b, j) >= 0 for j in range(4)] for b in range(2)])
    for b in range(2):
        keep = np.repeat(pool_mask[b], G)[:s.lens[b]]
        want = dense_attention(np.asarray(q[b, 0], np.float32), s.k[b][:s.lens[b]][keep],
                               s.v[b][:s.lens[b]][keep], int(keep.sum()))
        np.testing.assert_allclose(np.asarray(got[b, 0], np.float32), want, atol=0.03)


def test_num_splits_fill_one_wave():
    assert pallas_attention.num_splits(64, 8, 256, 132) == 1  # programs enough
    assert pallas_attention.num_splits(3, 8, 256, 132) == 11  # 264 / 24
    assert pallas_attention.num_splits(1, 8, 1024, 132) == 32  # 33: MAX_SPLITS
    # few KV heads: the power of two of splits that a wave holds, up to MAX_WAVE_SPLITS
    assert pallas_attention.num_splits(1, 3, 1024, 132) == 64  # 88
    assert pallas_attention.num_splits(1, 1, 1024, 132) == pallas_attention.MAX_WAVE_SPLITS
    assert pallas_attention.num_splits(1, 3, 40, 132) == 40  # at most one block each


def test_decode_kernel_pool_block_past_the_first_slot_scan():
    """The sink in the first POOL_SCAN blocks of the split, the tail past them."""
    n = pallas_attention.POOL_SCAN + 3
    s = Sequences([np.arange(n)[::-1]], hk=1, seed=16, num_blocks=n, pool_slots=n)
    s.step([(n - 1) * G + 5])
    s.step([1])
    assert s.slot(0, 0) >= 0 and s.slot(0, n - 2) == -1 and s.slot(0, n - 1) >= 0
    # Queries along the last token's key: the tail block dominates the output.
    q = np.broadcast_to(s.k[0][-1], (1, 1, 4, D)).astype(np.float16)
    _kernel_vs_reference(s, q, [1], True, 1, atol=0.03)


def test_decode_kernel_empty_sequence_gives_zeros():
    s = Sequences([[3, 5, -1, -1], [1, 9, -1, -1]], seed=18)
    s.step([70, 0])
    q = np.random.default_rng(19).standard_normal((2, 1, 4, D)).astype(np.float16)
    out = pallas_attention.attention(jnp.asarray(q), s.cache, jnp.asarray(s.tables),
                                     jnp.asarray(s.lens), splits=3)
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isfinite(np.asarray(out[0])))


@pytest.mark.parametrize("preset,d", [("kvarn_k4v2_g128", 128), ("kvarn_k2v2_g64", 64),
                                      ("kvarn_k4v4_g64", 256)])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("sq", [1, 5])
def test_attention_kernel_lowers_for_cuda(preset, d, dtype, sq):
    from test_jax_codec import lower_for_cuda

    kv = cache.init(16, 2, d, pool_slots=4, preset=preset, dtype=dtype)
    q = jax.ShapeDtypeStruct((3, sq, 8, d), dtype)
    ints = jax.ShapeDtypeStruct((3,), jnp.int32)
    hlo = lower_for_cuda(
        lambda q, kv, bt, lens, qlens: pallas_attention.attention(q, kv, bt, lens, qlens,
                                                                  splits=2, interpret=False),
        q, kv, jax.ShapeDtypeStruct((3, 5), jnp.int32), ints, ints)
    assert "__gpu$xla.gpu.triton" in hlo


def test_chunk_invariant_kernel_lowers_for_cuda():
    from test_jax_codec import lower_for_cuda

    kv = cache.init(16, 2, 128, pool_slots=4, preset="kvarn_k4v2_g128", dtype=jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((3,), jnp.int32)
    hlo = lower_for_cuda(
        lambda q, kv, bt, lens, qlens: pallas_attention.attention(
            q, kv, bt, lens, qlens, splits=2, chunk_invariant=True, interpret=False),
        jax.ShapeDtypeStruct((3, 5, 8, 128), jnp.bfloat16), kv,
        jax.ShapeDtypeStruct((3, 5), jnp.int32), ints, ints)
    assert "__gpu$xla.gpu.triton" in hlo


def test_decode_call_is_the_two_kernels():
    """No XLA op around the attention and merge kernels of a decode call (a pad of the
    query rows or a broadcast of the query lengths would each be a kernel launch)."""
    from test_jax_codec import lower_for_cuda

    kv = cache.init(16, 2, D, pool_slots=4, dtype=jnp.float16)
    ints = jax.ShapeDtypeStruct((3,), jnp.int32)
    hlo = lower_for_cuda(
        lambda q, kv, bt, lens: pallas_attention.attention(q, kv, bt, lens, interpret=False),
        jax.ShapeDtypeStruct((3, 1, 6, D), jnp.float16), kv,
        jax.ShapeDtypeStruct((3, 5), jnp.int32), ints)
    ops = set(re.findall(r"= (stablehlo\.[a-z_]+)", hlo))
    assert hlo.count("__gpu$xla.gpu.triton") == 2 and ops <= {"stablehlo.reshape",
                                                               "stablehlo.custom_call"}, ops


def test_attention_shape_errors():
    s = Sequences([[3, -1]])
    s.step([10])
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        pallas_attention.attention(jnp.zeros((1, 1, 3, D), jnp.float16), s.cache,
                                   jnp.asarray(s.tables), jnp.asarray(s.lens))
    with pytest.raises(ValueError, match="block_tables must be"):
        pallas_attention.attention(jnp.zeros((2, 1, 4, D), jnp.float16), s.cache,
                                   jnp.asarray(s.tables), jnp.asarray(s.lens))
    q = jnp.zeros((1, 1, 4, D), jnp.float16)
    with pytest.raises(TypeError, match="block_tables must hold integers"):
        pallas_attention.attention(q, s.cache, jnp.asarray(s.tables, jnp.float32),
                                   jnp.asarray(s.lens))
    with pytest.raises(ValueError, match="query_lens must be"):
        pallas_attention.attention(q, s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens),
                                   jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="splits must be a positive int"):
        pallas_attention.attention(q, s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens),
                                   splits=0)


def test_cache_op_errors_name_the_fix():
    s = Sequences([[3, 5, -1, -1]])
    k = jnp.zeros((4, 2, D), jnp.float16)
    slots = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=rf"k and v must be \[T, 2, {D}\]"):
        cache.append(s.cache, k[:, :1], k[:, :1], slots)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T=4\] integers"):
        cache.append(s.cache, k, k, slots.astype(jnp.float32))
    with pytest.raises(TypeError, match="k and v must be float16, the pool's dtype"):
        cache.append(s.cache, k.astype(jnp.float32), k, slots)
    tables, lens = jnp.asarray(s.tables), jnp.asarray(s.lens)
    with pytest.raises(ValueError, match=r"block_tables must be \[B, M\]"):
        cache.commit(s.cache, tables[0], lens, lens)
    with pytest.raises(ValueError, match=r"seq_lens / query_lens must be \[B=1\]"):
        cache.release(s.cache, tables, jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match="integer arrays"):
        cache.commit(s.cache, tables, lens.astype(jnp.float32), lens)
    with pytest.raises(TypeError, match="integer arrays"):
        cache.gather_kv(s.cache, tables.astype(jnp.float32), 2)


def test_cache_ops_jit_with_donation():
    s = Sequences([[3, 5, -1, -1]])
    step = jax.jit(lambda c, k, v, m: cache.append(c, k, v, m, impl="auto"),
                   donate_argnums=0)
    k = jnp.zeros((4, 2, D), jnp.float16)
    c = step(s.cache, k, k, jnp.arange(3 * G, 3 * G + 4, dtype=jnp.int32))
    assert int(c.block_to_slot[3]) == 0
