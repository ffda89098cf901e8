"""Properties of the specification itself (the other paths are compared with it)."""

import numpy as np
import pytest

from kvarn import oracle
from kvarn.format import layout
from kvarn.tiles import DTYPES, adversarial_tiles, random_tiles


def _hadamard(d):
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotate_is_the_normalized_hadamard_and_its_own_inverse(d):
    x = np.random.default_rng(0).standard_normal((32, d)).astype(np.float32)
    np.testing.assert_allclose(oracle.rotate(x), x @ _hadamard(d), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(oracle.rotate(oracle.rotate(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_is_lsb_first_and_unpack_inverts_it(bits):
    q = np.random.default_rng(1).integers(0, 1 << bits, (3, 128)).astype(np.uint8)
    w = oracle.pack(q, bits)
    assert w.shape == (3, 128 * bits // 8)
    assert w[0, 0] == sum(int(q[0, i]) << (i * bits) for i in range(8 // bits))
    np.testing.assert_array_equal(oracle.unpack(w, bits), q)


def test_canonicalize():
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 2.0**-101, -(2.0**-99), 70000.0], np.float32)
    got = oracle.canonicalize(x)
    np.testing.assert_array_equal(got, [0, 65504, -65504, 0, 0, -(2.0**-99), 65504])
    assert not np.signbit(got[3])


def _record_fields(records, preset, d):
    lay = layout(preset, d)
    return {n: oracle.field(records, lay, n) for n in lay.fields}


@pytest.mark.parametrize("preset", ["kvarn_k4v2_g128", "kvarn_k2v2_g64", "kvarn_k4v4_g64"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_error_is_within_half_a_step(preset, dtype):
    """|x - x_hat| <= step/2 per element, up to the fp16 rounding of the stored scales
    (relative 2^-11, or absolute 2^-25 where a scale falls in fp16's subnormal range)."""
    g = int(preset.rsplit("g", 1)[1])
    rng = np.random.default_rng(2)
    k = oracle.rotate(random_tiles(rng, 64, g, 128, dtype))
    v = oracle.rotate(random_tiles(rng, 64, g, 128, dtype))
    rec = oracle.quantize(k, v, preset)
    k_hat, v_hat = oracle.dequantize(rec, preset, 128)
    f = _record_fields(rec, preset, 128)
    fp16_rel = 2.0**-10  # a, z and the other-axis scale are each rounded to fp16
    # K: rows are channels (a_k, z_k per channel), columns tokens (tau_k).
    step_k = np.abs(f["a_k"])[:, None, :] * f["tau_k"][:, :, None]
    mag_k = (np.abs(k_hat) + np.abs(f["z_k"])[:, None, :] * f["tau_k"][:, :, None])
    err_k = np.abs(k_hat - oracle.canonicalize(k))  # bf16 beyond 65504 saturates
    sub_k = 2.0**-24 * (2**int(preset[7]) + 1) * f["tau_k"][:, :, None]
    assert np.all(err_k <= step_k * (0.5 + fp16_rel) + mag_k * 3 * fp16_rel + sub_k)
    step_v = np.abs(f["a_v"])[:, :, None] * f["sigma_v"][:, None, :]
    mag_v = (np.abs(v_hat) + np.abs(f["z_v"])[:, :, None] * f["sigma_v"][:, None, :])
    err_v = np.abs(v_hat - oracle.canonicalize(v))
    sub_v = 2.0**-24 * (2**int(preset[9]) + 1) * f["sigma_v"][:, None, :]
    assert np.all(err_v <= step_v * (0.5 + fp16_rel) + mag_v * 3 * fp16_rel + sub_v)


def test_gaussian_reconstruction_error():
    rng = np.random.default_rng(3)
    x = oracle.rotate(rng.standard_normal((64, 128, 128)).astype(np.float16))
    k_hat, v_hat = oracle.dequantize(oracle.quantize(x, x, "kvarn_k4v2_g128"), "kvarn_k4v2_g128", 128)
    rel = lambda a: np.linalg.norm(a - x.astype(np.float32)) / np.linalg.norm(x.astype(np.float32))  # noqa: E731
    assert rel(k_hat) < 0.11  # 4-bit: step/sqrt(12) of a ~5-sigma range / 15
    assert rel(v_hat) < 0.52  # 2-bit


def test_best_iterate_is_never_worse_than_the_identity():
    rng = np.random.default_rng(4)
    x = oracle.canonicalize(random_tiles(rng, 64, 128, 128, "float16"))
    c, r = oracle.normalize(x, 8)
    y = oracle.rescale(x, c, r)
    imb = oracle.imbalance(oracle.std(y, -2), oracle.std(y, -1))
    identity = oracle.imbalance(oracle.std(x, -2), oracle.std(x, -1))
    assert np.all(imb <= identity)
    assert np.any(imb < identity * 0.5)  # it does balance outlier channels and tokens


def test_zero_iterations_means_unit_scales():
    x = oracle.rotate(random_tiles(np.random.default_rng(5), 8, 64, 64, "bfloat16"))
    f = _record_fields(oracle.quantize(x, x, "kvarn_k4v4_g64", iters=0), "kvarn_k4v4_g64", 64)
    assert np.all(f["tau_k"] == 1) and np.all(f["sigma_v"] == 1)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_adversarial_tiles_give_finite_records_without_negative_zeros(dtype):
    tiles = adversarial_tiles(128, 128, dtype)
    x = np.stack(list(tiles.values()))
    rec = oracle.quantize(x, x, "kvarn_k4v2_g128")
    f = _record_fields(rec, "kvarn_k4v2_g128", 128)
    for name in ("a_k", "z_k", "tau_k", "sigma_v", "a_v", "z_v"):
        assert np.all(np.isfinite(f[name])), name
        assert not np.any((f[name] == 0) & np.signbit(f[name])), name
    k_hat, _ = oracle.dequantize(rec, "kvarn_k4v2_g128", 128)
    zeros = list(tiles).index("zeros")
    assert np.all(k_hat[zeros] == 0)
    const = list(tiles).index("constant")
    np.testing.assert_allclose(k_hat[const], 1.5, rtol=2e-3)


def test_errors_name_the_fix():
    x = np.zeros((2, 128, 128), np.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        oracle.quantize(x.astype(np.float32), x.astype(np.float32), "kvarn_k4v2_g128")
    with pytest.raises(ValueError, match="tiles of 64 tokens"):
        oracle.quantize(x, x, "kvarn_k4v2_g64")
    with pytest.raises(ValueError, match="shapes differ"):
        oracle.quantize(x, x[:1], "kvarn_k4v2_g128")
    with pytest.raises(ValueError, match=r"\[N, tile, head_dim\]"):
        oracle.quantize(x[0], x[0], "kvarn_k4v2_g128")
    with pytest.raises(ValueError, match="64, 128, 256"):
        oracle.quantize(x[..., :96], x[..., :96], "kvarn_k4v2_g128")
    with pytest.raises(ValueError, match="iters"):
        oracle.quantize(x, x, "kvarn_k4v2_g128", iters=-1)
    with pytest.raises(ValueError, match=r"\[N, 13824\]"):
        oracle.dequantize(np.zeros((2, 100), np.uint8), "kvarn_k4v2_g128", 128)
    with pytest.raises(TypeError, match="uint8"):
        oracle.dequantize(np.zeros((2, 13824), np.int8), "kvarn_k4v2_g128", 128)
    with pytest.raises(TypeError, match="cast first"):
        oracle.rotate(np.zeros((4, 128), np.int32))


def test_rescaled_fp16_tiles_never_reach_the_subnormals(monkeypatch):
    """The kernels skip the rescale's subnormal flush for fp16 tiles (it cannot fire):
    the bound, and the oracle run on the tiles that push it hardest."""
    assert not oracle.rescale_can_underflow("float16")
    assert oracle.rescale_can_underflow("bfloat16")
    smallest = np.float32(np.finfo(np.float16).smallest_subnormal)  # 2^-24
    rcp_max = np.float32(1) / oracle.SCALE_MAX
    assert smallest * rcp_max * rcp_max >= np.float32(2.0**-60) > oracle.F32_MIN_NORMAL

    g = d = 128
    perm = np.random.default_rng(2).permutation(d)
    extreme = np.full((g, d), smallest, np.float32)  # a 65504 in every row and column
    extreme[np.arange(g), perm] = 65504.0
    tiles = [*adversarial_tiles(g, d, "float16").values(), extreme.astype(np.float16),
             random_tiles(np.random.default_rng(3), 64, g, d, "float16")]
    x = np.concatenate([t.reshape(-1, g, d) for t in tiles])
    smallest_y, largest_scale = [], []

    def rescale(x, c, r):
        y = x * (np.float32(1) / c) * (np.float32(1) / r)
        smallest_y.append(np.abs(y[y != 0]).min(initial=np.inf))
        largest_scale.append(max(c.max(), r.max()))
        return oracle_rescale(x, c, r)

    oracle_rescale = oracle.rescale
    monkeypatch.setattr(oracle, "rescale", rescale)
    for k_or_v in (np.swapaxes(x, 1, 2), x):  # rows = channels (K), rows = tokens (V)
        oracle.normalize(oracle.canonicalize(k_or_v))
    assert max(largest_scale) == oracle.SCALE_MAX  # the extreme tile reached the cap
    assert min(smallest_y) >= oracle.F32_MIN_NORMAL
