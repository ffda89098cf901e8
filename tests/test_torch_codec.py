"""kvarn_torch against the NumPy oracle, byte for byte: the torch reference and the Triton
kernels (in Triton's interpreter when no GPU is present) over every preset, head_dim and
dtype, on random and adversarial tiles, plus the errors of bad inputs.

Tile counts scale with KVARN_TEST_SCALE (default 1; e.g. 10 for a long run).
"""

import os

import torch

if not torch.cuda.is_available():  # the kernels must be defined under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kvarn_torch  # noqa: E402
from kvarn import oracle  # noqa: E402
from kvarn.format import HEAD_DIMS, PRESETS, layout  # noqa: E402
from kvarn.tiles import adversarial_tiles as shared_adversarial_tiles  # noqa: E402
from kvarn_torch import reference, triton_quantize, triton_rotate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = float(os.environ.get("KVARN_TEST_SCALE", "1"))
REF_TILES = max(1, int(48 * SCALE))  # random tiles per case, torch reference (~10 ms/tile)
TRITON_TILES = max(1, int((16 if DEVICE == "cuda" else 2) * SCALE))  # interpreted: ~1 s/tile
TILE_DTYPES = (torch.float16, torch.bfloat16)
BF16 = ml_dtypes.bfloat16
CASES = [(p, d, dt) for p in PRESETS for d in HEAD_DIMS for dt in TILE_DTYPES]


def case_id(case):
    p, d, dt = case
    return f"{p}-d{d}-{str(dt).removeprefix('torch.')}"


# ---------------------------------------------------------------- helpers


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as the numpy array the oracle takes (bfloat16 via ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def from_f32(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 values rounded to `dtype` (nearest-even, inf/nan kept) as a torch tensor."""
    if dtype == torch.bfloat16:
        bits = np.ascontiguousarray(x.astype(BF16)).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).to(DEVICE)
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
    with np.errstate(over="ignore"):
        return torch.from_numpy(x.astype(np_dtype)).to(DEVICE)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        a.view(np.uint8), b.view(np.uint8)
    )


def assert_records_equal(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    got = got.cpu().numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} bytes differ, first (tile, byte) {bad[:5].tolist()}"


def assert_f32_identical(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    """Bit-identical float32, except that any NaN matches any NaN (payloads may differ)."""
    got = got.cpu().numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(got) & np.isnan(want)
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~nan
    assert not bad.any(), f"{what}: {bad.sum()} differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


def random_tiles(rng: np.random.Generator, n: int, g: int, d: int) -> np.ndarray:
    """KV-like float32 tiles: per-channel and per-token scales, heavy tails, some offsets."""
    x = rng.standard_t(df=4, size=(n, g, d)).astype(np.float32)
    x *= rng.lognormal(0.0, 1.0, (n, 1, d)).astype(np.float32)  # channel scales
    x *= rng.lognormal(0.0, 0.5, (n, g, 1)).astype(np.float32)  # token scales
    x += rng.normal(0.0, 0.5, (n, 1, d)).astype(np.float32)  # channel offsets
    x *= np.float32(10.0) ** rng.uniform(-3, 2, (n, 1, 1)).astype(np.float32)  # tile magnitude
    return x


def adversarial_tiles(g: int, d: int, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Named [g, d] float32 tiles (g >= 16) with degenerate statistics and extreme values."""
    rng = np.random.default_rng(1234)
    base = rng.standard_normal((g, d)).astype(np.float32)
    big = 3e38 if dtype == torch.bfloat16 else 65504.0  # largest finite-ish of the dtype
    tiny = 1e-30 if dtype == torch.bfloat16 else 6e-8  # below / near the dtype's normals
    tiles = {"zeros": np.zeros((g, d), np.float32), "constant": np.full((g, d), 1.5, np.float32)}
    t = base.copy(); t[3, :] = 2.0; tiles["constant_row"] = t
    t = base.copy(); t[:, 5] = -7.0; tiles["constant_column"] = t
    t = base.copy(); t[:, 7] *= 5000.0; tiles["outlier_channel"] = t
    t = base.copy(); t[11, :] *= 5000.0; tiles["outlier_token"] = t
    t = base.copy(); t[0, 0] = 1e4; tiles["single_spike"] = t
    t = base.copy(); t[::3, ::5] = big; t[1::7, 2::3] = -big; tiles["saturated"] = t
    t = base.copy(); t[0, :4] = [np.inf, -np.inf, np.nan, -np.nan]; t[5, 9] = np.nan
    tiles["inf_nan"] = t
    t = np.full((g, d), np.nan, np.float32); tiles["all_nan"] = t
    t = base * np.float32(tiny); tiles["tiny"] = t
    sign = np.where((np.arange(g)[:, None] + np.arange(d)[None, :]) % 2 == 0, 1.0, -1.0)
    tiles["alternating"] = sign.astype(np.float32)
    # Half-integer ramps over [0, qmax] in every row and column: with iters=0 the step is
    # exactly 1 and (b - lo) / delta hits .5 ties, rounded to even.
    ramp = np.arange(g)[:, None] + np.arange(d)[None, :]
    tiles["ties_4bit"] = (ramp % 31 * 0.5).astype(np.float32)
    tiles["ties_2bit"] = (ramp % 7 * 0.5).astype(np.float32)
    tiles["ramp_int"] = (ramp * 3 % 16).astype(np.float32)
    t = base.copy(); t[:, : d // 2] = 0.0; tiles["half_zero"] = t
    tiles["mixed_scales"] = base * np.float32(10.0) ** np.linspace(-20, 4, d, dtype=np.float32)
    if dtype == torch.bfloat16:
        # around the 2^-100 input flush, and bf16 subnormals
        e = np.float32(2.0**-100)
        vals = np.array([e, -e, e * 1.0078125, e * 0.9921875, -e * 0.5, 1e-40, -1e-39, 1e-30],
                        np.float32)
        tiles["near_flush"] = np.resize(vals, (g, d)) * np.where(rng.random((g, d)) < 0.5, 1, 3)
        t = base.copy(); t[2, :] = 3.3e38; t[4, :] = -3.38e38; tiles["bf16_extremes"] = t
        tiles["scaled_1e30"] = base * np.float32(1e30)
    else:
        t = base.copy(); t[::2, ::2] = 65519.0; t[1::2, 1::2] = -70000.0  # rounds to +-inf
        tiles["past_fp16_max"] = t
        tiles["fp16_subnormal"] = base * np.float32(1e-6)
    return {name: t.astype(np.float32) for name, t in tiles.items()}


def all_adversarial(g: int, d: int, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """These tests' adversarial tiles plus the project's shared set (kvarn.tiles), float32."""
    name = str(dtype).removeprefix("torch.")
    shared = shared_adversarial_tiles(g, d, name)
    return adversarial_tiles(g, d, dtype) | {
        f"shared_{k}": t.astype(np.float32) for k, t in shared.items()
    }


def stack(tiles: dict[str, np.ndarray], names=None) -> np.ndarray:
    return np.stack([tiles[n] for n in (names or tiles)])


TIE_TILES = ("ties_4bit", "ties_2bit", "ramp_int", "constant_row")


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240607)


# ---------------------------------------------------------------- rotate

ROTATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROTATE_IMPLS = {"reference": reference.rotate, "triton": triton_rotate.rotate}


@pytest.mark.parametrize("impl", list(ROTATE_IMPLS))
@pytest.mark.parametrize("dtype", ROTATE_DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_rotate_matches_oracle(impl, dtype, d, rng):
    x = random_tiles(rng, 3, 7, d)  # 21 rows: not a multiple of the kernel's row block
    adv = stack(adversarial_tiles(16, d, dtype if dtype != torch.float32 else torch.bfloat16))
    x = np.concatenate([x.reshape(-1, d), adv.reshape(-1, d)])[None]
    xt = from_f32(x, dtype)
    got = ROTATE_IMPLS[impl](xt)
    assert got.dtype == dtype and got.shape == xt.shape
    want = oracle.rotate(to_numpy(xt))
    assert same_bits(to_numpy(got), want), f"{impl} rotate differs from the oracle"


@pytest.mark.parametrize("impl", list(ROTATE_IMPLS))
def test_rotate_is_own_inverse_and_handles_empty(impl):
    x = from_f32(np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32),
                 torch.float32)
    back = kvarn_torch.unrotate(kvarn_torch.rotate(x, impl=impl), impl=impl)
    assert torch.allclose(back, x, atol=1e-5)
    empty = torch.zeros((0, 3, 128), dtype=torch.float16, device=DEVICE)
    assert ROTATE_IMPLS[impl](empty).shape == empty.shape


# ---------------------------------------------------------------- quantize


def _check_quantize(fn, k: torch.Tensor, v: torch.Tensor, preset: str, iters: int, what: str):
    want = oracle.quantize(to_numpy(k), to_numpy(v), preset, iters)
    assert_records_equal(fn(k, v, preset, iters), want, what)
    return want


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_quantize_random(case, rng):
    preset, d, dtype = case
    g = PRESETS[preset].tile
    k = from_f32(random_tiles(rng, REF_TILES, g, d), dtype)
    v = from_f32(random_tiles(rng, REF_TILES, g, d), dtype)
    k, v = reference.rotate(k), reference.rotate(v)  # as in the cache: rotated tiles
    _check_quantize(reference.quantize, k, v, preset, 8, "reference")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_quantize_random(case, rng):
    preset, d, dtype = case
    g = PRESETS[preset].tile
    k = from_f32(random_tiles(rng, TRITON_TILES, g, d), dtype)
    v = from_f32(random_tiles(rng, TRITON_TILES, g, d), dtype)
    _check_quantize(triton_quantize.quantize, k, v, preset, 8, "triton")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_quantize_adversarial(case):
    preset, d, dtype = case
    g = PRESETS[preset].tile
    x = stack(all_adversarial(g, d, dtype))
    k, v = from_f32(x, dtype), from_f32(x[::-1].copy(), dtype)  # pair different tiles
    for iters in (0, 8):
        _check_quantize(reference.quantize, k, v, preset, iters, f"reference iters={iters}")


TRITON_ADVERSARIAL = [
    ("kvarn_k4v2_g128", 128, torch.float16),
    ("kvarn_k2v2_g64", 64, torch.bfloat16),
]


@pytest.mark.parametrize("case", TRITON_ADVERSARIAL, ids=case_id)
def test_triton_quantize_adversarial(case):
    """These tests' own adversarial set (the shared one goes through the reference above)."""
    preset, d, dtype = case
    g = PRESETS[preset].tile
    tiles = adversarial_tiles(g, d, dtype)
    x = stack(tiles)
    k, v = from_f32(x, dtype), from_f32(x[::-1].copy(), dtype)
    _check_quantize(triton_quantize.quantize, k, v, preset, 8, "triton")
    ties = from_f32(stack(tiles, TIE_TILES), dtype)  # iters=0 keeps the RTN's .5 ties exact
    _check_quantize(triton_quantize.quantize, ties, ties, preset, 0, "triton iters=0")


@pytest.mark.parametrize("iters", range(17))
def test_iteration_counts(iters, rng):
    preset, d = "kvarn_k4v2_g64", 64
    x = random_tiles(rng, 8, 64, d)
    k, v = from_f32(x, torch.bfloat16), from_f32(x[:, ::-1].copy(), torch.bfloat16)
    _check_quantize(reference.quantize, k, v, preset, iters, f"reference iters={iters}")
    _check_quantize(triton_quantize.quantize, k[:1], v[:1], preset, iters, f"triton {iters}")


def test_codec_dispatch_and_empty_batch(rng):
    k = from_f32(random_tiles(rng, 1, 64, 64), torch.float16)
    v = from_f32(random_tiles(rng, 1, 64, 64), torch.float16)
    want = oracle.quantize(to_numpy(k), to_numpy(v), "kvarn_k4v4_g64", 3)
    for impl in ("auto", "reference", "triton"):
        got = kvarn_torch.quantize(k, v, "kvarn_k4v4_g64", iters=3, impl=impl)
        assert_records_equal(got, want, impl)
    empty = torch.zeros((0, 64, 64), dtype=torch.float16, device=DEVICE)
    for fn in (reference.quantize, triton_quantize.quantize):
        records = fn(empty, empty, "kvarn_k4v4_g64")
        assert records.shape == (0, layout("kvarn_k4v4_g64", 64).record_bytes)
    k, v = kvarn_torch.dequantize(records, "kvarn_k4v4_g64", 64)
    assert k.shape == v.shape == (0, 64, 64)


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_dequantize_matches_oracle(preset, d, rng):
    g = PRESETS[preset].tile
    with np.errstate(over="ignore"):
        x = random_tiles(rng, 4, g, d).astype(np.float16)
    records = oracle.quantize(x, x[:, ::-1], preset, 8)
    noise = rng.integers(0, 256, records.shape, dtype=np.uint8)  # any bytes, NaN/inf fields too
    records = np.concatenate([records, noise])
    with np.errstate(invalid="ignore", over="ignore"):
        ko, vo = oracle.dequantize(records, preset, d)
    for impl in ("reference", "triton", "auto"):
        k, v = kvarn_torch.dequantize(torch.from_numpy(records).to(DEVICE), preset, d, impl=impl)
        assert_f32_identical(k, ko, f"{impl} K")
        assert_f32_identical(v, vo, f"{impl} V")


# ---------------------------------------------------------------- errors

QUANTIZE_IMPLS = {"reference": reference.quantize, "triton": triton_quantize.quantize}


def _tiles(shape, dtype=torch.float16):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("impl", list(QUANTIZE_IMPLS))
@pytest.mark.parametrize(
    "k_shape, k_dtype, v_shape, v_dtype, preset, error, match",
    [
        ((2, 128, 128), torch.float32, (2, 128, 128), torch.float32, "kvarn_k4v2_g128",
         TypeError, "float16 or bfloat16"),
        ((2, 128, 128), torch.float16, (2, 128, 128), torch.bfloat16, "kvarn_k4v2_g128",
         TypeError, "dtypes differ"),
        ((2, 128, 128), torch.float16, (3, 128, 128), torch.float16, "kvarn_k4v2_g128",
         ValueError, "shapes differ"),
        ((2, 64, 128), torch.float16, (2, 64, 128), torch.float16, "kvarn_k4v2_g128",
         ValueError, "tiles of 128 tokens"),
        ((2, 128, 96), torch.float16, (2, 128, 96), torch.float16, "kvarn_k4v2_g128",
         ValueError, "head_dim 96"),
        ((128, 128), torch.float16, (128, 128), torch.float16, "kvarn_k4v2_g128",
         ValueError, "N, tile, head_dim"),
        ((2, 64, 64), torch.float16, (2, 64, 64), torch.float16, "kvarn_k8v8_g64",
         ValueError, "unknown KVarN preset"),
    ],
)
def test_quantize_errors(impl, k_shape, k_dtype, v_shape, v_dtype, preset, error, match):
    with pytest.raises(error, match=match):
        QUANTIZE_IMPLS[impl](_tiles(k_shape, k_dtype), _tiles(v_shape, v_dtype), preset)


@pytest.mark.parametrize("impl", list(QUANTIZE_IMPLS))
@pytest.mark.parametrize("iters", [-1, 65, 2.0, None])
def test_quantize_bad_iters(impl, iters):
    t = _tiles((1, 64, 64))
    with pytest.raises(ValueError, match="iters"):
        QUANTIZE_IMPLS[impl](t, t, "kvarn_k4v4_g64", iters)


@pytest.mark.parametrize("impl", list(ROTATE_IMPLS))
def test_rotate_errors(impl):
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        ROTATE_IMPLS[impl](torch.zeros((2, 64), dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        ROTATE_IMPLS[impl](torch.zeros((2, 64), dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="head_dim of 64, 128 or 256"):
        ROTATE_IMPLS[impl](_tiles((2, 96)))
    with pytest.raises(ValueError, match="head_dim of 64, 128 or 256"):
        ROTATE_IMPLS[impl](torch.zeros((), dtype=torch.float16, device=DEVICE))


def test_dequantize_errors():
    rb = layout("kvarn_k4v2_g128", 128).record_bytes
    with pytest.raises(TypeError, match="uint8"):
        kvarn_torch.dequantize(torch.zeros((2, rb), dtype=torch.int8), "kvarn_k4v2_g128", 128)
    with pytest.raises(ValueError, match=f"\\[N, {rb}\\]"):
        kvarn_torch.dequantize(torch.zeros((2, rb + 16), dtype=torch.uint8), "kvarn_k4v2_g128", 128)
    with pytest.raises(ValueError, match=f"\\[N, {rb}\\]"):
        kvarn_torch.dequantize(torch.zeros((2, 1, rb), dtype=torch.uint8), "kvarn_k4v2_g128", 128)
    with pytest.raises(ValueError, match="head_dim 80"):
        kvarn_torch.dequantize(torch.zeros((2, rb), dtype=torch.uint8), "kvarn_k4v2_g128", 80)


def test_codec_rejects_unknown_impl():
    x = _tiles((1, 64, 64))
    with pytest.raises(ValueError, match="impl must be one of"):
        kvarn_torch.rotate(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        kvarn_torch.quantize(x, x, "kvarn_k4v4_g64", impl="pallas")
