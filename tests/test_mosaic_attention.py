"""kvarn_jax.mosaic_attention: the Mosaic GPU decode kernel of the quantized records (with
the Pallas kernel for the pool blocks and its merge) against the exact float32 attention.

The kernel's register code has no interpreter: the numerical tests need an sm_90+ GPU
under JAX. On the CPU: the input checks, the record table, the row permutation the
register layouts rest on, and the conversion of its partials into the merge's format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvarn_jax  # noqa: F401
from kvarn import oracle
from kvarn_jax import attention_reference, cache, mosaic_attention, pallas_attention, reference
from test_jax_attention import Sequences

PRESET = "kvarn_k4v2_g128"
G = D = 128


def _sm90() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0)) >= 9.0


gpu = pytest.mark.skipif(not _sm90(), reason="needs an sm_90+ GPU under JAX")


def _sequences(tables, lens, dtype, hk=2, seed=0, **kw):
    """Sequences of `lens` tokens, accepted: the sink and partial last blocks in the pool,
    the blocks between them quantized records."""
    n = int(np.max(tables)) + 1
    s = Sequences(tables, hk=hk, dtype=dtype, d=D, preset=PRESET, seed=seed, num_blocks=n,
                  pool_slots=n, **kw)
    s.step(list(lens))
    s.step([1] * len(lens))
    return s


def _vs_reference(s, group, dtype, splits=None, seed=1):
    b = len(s.lens)
    q = np.random.default_rng(seed).standard_normal((b, 1, s.hk * group, D)).astype(dtype)
    args = (s.cache, jnp.asarray(s.tables), jnp.asarray(s.lens))
    got = mosaic_attention.attention(jnp.asarray(q), *args, splits=splits)
    want = attention_reference.attention(jnp.asarray(q, jnp.float32), *args,
                                         jnp.ones((b,), jnp.int32), max_blocks=s.tables.shape[1])
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.03, rtol=0)


@gpu
@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_mixed_blocks_ragged_lengths(dtype, group, splits):
    tables = np.arange(3 * 9, dtype=np.int32).reshape(3, 9)[:, ::-1].copy()
    s = _sequences(tables, [1000, 620, 130], dtype)
    assert min(s.slot(0, j) for j in range(7)) == -1 and s.slot(0, 0) >= 0
    _vs_reference(s, group, dtype, splits)


@gpu
def test_decode_pool_only_and_records_only():
    tables = np.arange(2 * 4, dtype=np.int32).reshape(2, 4)
    pool = Sequences(tables, dtype=np.float16, d=D, preset=PRESET, num_blocks=8, pool_slots=8)
    pool.step([300, 200], commit=False)  # nothing accepted: every block in the pool
    _vs_reference(pool, 4, np.float16, splits=2)
    records = _sequences(tables, [511, 255], np.float16, sink_blocks=0)
    records.step([0, 0])
    assert all(records.slot(b, j) == -1 for b, j in ((0, 0), (0, 3), (1, 1)))
    _vs_reference(records, 4, np.float16, splits=3)  # a split of sequence 1 is empty


def test_unsupported_names_what_to_change():
    kv = cache.init(8, 2, D, pool_slots=4, preset=PRESET, dtype=jnp.float16)
    why = mosaic_attention.unsupported
    assert "decode queries" in why(jnp.zeros((1, 2, 8, D), jnp.float16), kv)
    assert "GQA groups <= 8" in why(jnp.zeros((1, 1, 32, D), jnp.float16), kv)
    small = cache.init(8, 2, 64, pool_slots=4, preset="kvarn_k2v2_g64", dtype=jnp.float16)
    assert "kvarn_k4v2_g128 at head_dim 128" in why(jnp.zeros((1, 1, 8, 64), jnp.float16), small)
    if not _sm90():
        assert "sm_90+ GPU" in why(jnp.zeros((1, 1, 8, D), jnp.float16), kv)
        with pytest.raises(ValueError, match="pallas_attention.attention takes every cache"):
            mosaic_attention.attention(jnp.zeros((1, 1, 8, D), jnp.float16), kv,
                                       jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32))
        assert not mosaic_attention.applies(jnp.zeros((64, 1, 8, D), jnp.float16), kv)


def test_record_blocks_drop_the_pool_blocks():
    rng = np.random.default_rng(0)
    b2s = np.where(rng.random(40) < 0.3, rng.integers(0, 9, 40), -1).astype(np.int32)
    tables = rng.permutation(40)[:36].reshape(4, 9).astype(np.int32)
    tables[3, 7:] = -1  # padding past a sequence's blocks
    got = np.asarray(mosaic_attention.record_blocks(jnp.asarray(b2s), jnp.asarray(tables)))
    want = np.where(b2s[np.maximum(tables, 0)] < 0, tables, -1)
    np.testing.assert_array_equal(got, want)
    assert (got == -1).sum() > 3 and (got >= 0).sum() > 20


def test_a_threads_rows_are_one_token_quad_and_one_v_code_byte():
    """Thread (w, g) holds rows 64 m + 16 w + 8 h + g: as K tokens one halfword of a channel
    row (4 tokens from 4 (8 w + g)), as V channels the 4 of code byte 8 w + g."""
    perm = mosaic_attention.PERM
    assert sorted(perm) == list(range(128))
    for w in range(4):
        for g in range(8):
            rows = [64 * m + 16 * w + 8 * h + g for m in range(2) for h in range(2)]
            assert [perm[r] for r in rows] == [4 * (8 * w + g) + e for e in range(4)]


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32: result byte i is byte sel's nibble i of {b, a} (a bytes 0-3)."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    return sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def test_v_operand_registers_hold_the_v_codes_of_their_rows_and_columns():
    """build_v's loads and prmt (v_read), emulated lane by lane on a record: row R of the
    operand is channel PERM[R] = 4 b + e, column t token t, value code * 4**e (in units
    of 2**-24), and each 16-bit load of a warp lands on its own bank (or shares a word)."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, (G, D))  # [token, channel]
    # The record's V code field (the oracle's packing, token-major) as its rows of 128
    # halfwords, as the kernel's f16 box holds them.
    rows = oracle.pack(codes, 2).reshape(-1).view("<u2").reshape(16, 128).astype(np.int64)
    got = np.full((128, 128), -1)
    for w in range(4):
        for c8 in range(16):
            for lane in range(32):
                g, k = divmod(lane, 4)
                off_a, off_b, sel = mosaic_attention.v_read(k, g)
                col0 = 32 * k + (8 * w + g) // 2
                x = _prmt(int(rows[c8, col0 + off_a]), int(rows[c8, col0 + off_b]), sel)
                for e in range(4):
                    m, h = divmod(e, 2)
                    v = x & (0x00030003 << 2 * e)
                    got[64 * m + 16 * w + 8 * h + g, 8 * c8 + 2 * k] = (v & 0xFFFF) >> 2 * e
                    got[64 * m + 16 * w + 8 * h + g, 8 * c8 + 2 * k + 1] = (v >> 16) >> 2 * e
            for which in (0, 1):  # one load: banks of the 32 lanes' 4-byte words
                words = {}
                for lane in range(32):
                    g, k = divmod(lane, 4)
                    col = 32 * k + (8 * w + g) // 2 + mosaic_attention.v_read(k, g)[which]
                    words.setdefault(col // 2 % 32, set()).add(col // 2)
                assert all(len(x) == 1 for x in words.values())
    np.testing.assert_array_equal(got, codes.T[mosaic_attention.PERM])


def test_k_code_loads_follow_the_64_byte_swizzle_without_bank_conflicts():
    """build_k reads channel row 2 k + j of column group c8 at column 8 (w ^ k) + g of the
    K_CODES buffer: where the TMA's 64-byte swizzle put token quad 8 w + g of that row,
    and the 32 lanes of a load on 16 distinct banks (lanes g, g + 1 share a word)."""
    def swizzled(byte):  # Mosaic GPU / TMA: 16-byte chunk ^= (byte // 128) % 4
        return byte ^ ((byte // 128) % 4) * 16

    for w in range(4):
        for c8 in range(16):
            for j in range(2):
                banks = {}
                for lane in range(32):
                    g, k = divmod(lane, 4)
                    row = 8 * c8 + 2 * k + j
                    read = row * 64 + (8 * (w ^ k) + g) * 2  # the kernel's load, in bytes
                    assert read == swizzled(row * 64 + (8 * w + g) * 2)
                    banks.setdefault(read // 4 % 32, set()).add(read // 4)
                assert len(banks) == 16 and all(len(x) == 1 for x in banks.values())


def test_merge_of_two_sets_of_partials_is_one_log_sum_exp():
    """The record kernel's partials (8 rows, W = 4 slots of which 3 splits, one empty) and
    the pool kernel's (16 rows, 1 split), merged by pallas_attention.merge, against a
    direct base-2 log-sum-exp."""
    rng = np.random.default_rng(1)
    b, hk, splits, group = 2, 2, 3, 4
    o = rng.standard_normal((b, hk, 4, 8, D)).astype(np.float32)
    m = rng.standard_normal((b, hk, 4, 8, 1)).astype(np.float32)
    l = rng.random((b, hk, 4, 8, 1)).astype(np.float32) + 0.5
    m[0, 0, 1], l[0, 0, 1], o[0, 0, 1] = pallas_attention.MASK, 0.0, 0.0  # no records
    o[:, :, 3], m[:, :, 3], l[:, :, 3] = np.nan, 1e30, np.nan  # past `splits`: unwritten
    rows = 16
    pool_o = rng.standard_normal((b, hk, 1, rows, D)).astype(np.float32)
    pool_m = rng.standard_normal((b, hk, 1, rows, 1)).astype(np.float32) * 1.4
    pool_l = rng.random((b, hk, 1, rows, 1)).astype(np.float32) + 0.5
    q = jnp.zeros((b, 1, hk * group, D), jnp.float32)
    got = pallas_attention.merge(jnp.asarray(o), jnp.asarray(l), jnp.asarray(m), q, splits,
                                 more=(pool_o, pool_l, pool_m, 1))
    mm = np.concatenate([m[:, :, :splits, :, 0], pool_m[..., :8, 0]], axis=2)
    ll = np.concatenate([l[:, :, :splits, :, 0], pool_l[..., :8, 0]], axis=2)
    oo = np.concatenate([o[:, :, :splits], pool_o[:, :, :, :8]], axis=2)
    w = np.exp2(mm - mm.max(axis=2, keepdims=True))
    out = (oo * w[..., None]).sum(2) / (ll * w).sum(2)[..., None]  # [b, hk, 8, D]
    want = np.asarray(reference.rotate(jnp.asarray(out[:, :, :group].reshape(b, hk * group, D))))
    np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 8])
def test_decode_lowers_for_cuda(dtype, group):
    """The Mosaic GPU lowering (in the CUDA plugin: `make test` installs it without its
    runtime) checks the kernel's layouts, shared-memory transforms and MMA shapes."""
    pytest.importorskip("jax_cuda13_plugin", reason="the Mosaic GPU lowering is in the plugin")
    from test_jax_codec import lower_for_cuda

    kv = cache.init(16, 2, D, pool_slots=4, preset=PRESET, dtype=dtype)
    hlo = lower_for_cuda(
        lambda q, kv, bt, lens: mosaic_attention._attention(q, kv, bt, lens, D ** -0.5, 3),
        jax.ShapeDtypeStruct((3, 1, 2 * group, D), dtype), kv,
        jax.ShapeDtypeStruct((3, 5), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32))
    assert "mosaic_gpu" in hlo and "__gpu$xla.gpu.triton" in hlo  # records, and pool + merge
