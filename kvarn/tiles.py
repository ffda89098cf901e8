"""Test tiles: random K/V-like tiles and the adversarial set of the bit-exact contract."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def random_tiles(rng: np.random.Generator, n: int, tile: int, head_dim: int,
                 dtype: str) -> np.ndarray:
    """[n, tile, head_dim] tiles mixing what real K/V look like: Gaussian bodies with
    outlier channels (keys), outlier tokens (values, sinks), heavy tails and scales
    from 1e-4 to 1e3."""
    g, d = tile, head_dim
    kind = rng.integers(0, 4, size=n)
    x = rng.standard_normal((n, g, d), dtype=np.float32)
    heavy = kind == 3
    x[heavy] = rng.standard_t(3, (int(heavy.sum()), g, d))
    x[kind == 1] *= rng.lognormal(0.0, 1.5, (int((kind == 1).sum()), 1, d)).astype(np.float32)
    x[kind == 2] *= rng.lognormal(0.0, 1.5, (int((kind == 2).sum()), g, 1)).astype(np.float32)
    x += (rng.standard_normal((n, 1, d)) * rng.uniform(0, 2, (n, 1, 1))).astype(np.float32)
    x *= (10.0 ** rng.uniform(-4, 3, (n, 1, 1))).astype(np.float32)
    return np.clip(x, -60000, 60000).astype(DTYPES[dtype])


def adversarial_tiles(tile: int, head_dim: int, dtype: str) -> dict[str, np.ndarray]:
    """Named [tile, head_dim] tiles that stress every rule of the contract."""
    g, d = tile, head_dim
    dt = DTYPES[dtype]
    rng = np.random.default_rng(12345)
    base = rng.standard_normal((g, d))
    big = 65504.0
    tiles = {
        "zeros": np.zeros((g, d)),
        "negative_zeros": -np.zeros((g, d)),
        "constant": np.full((g, d), 1.5),
        "constant_row": np.where(np.arange(g)[:, None] == 3, 7.25, base),
        "constant_column": np.where(np.arange(d)[None, :] == 5, -2.0, base),
        "outlier_channel": base * np.where(np.arange(d) == 17, 3000.0, 1.0),
        "outlier_token": base * np.where(np.arange(g)[:, None] == 0, 500.0, 1.0),
        "fp16_extremes": np.where(rng.random((g, d)) < 0.5, big, -big),
        "mixed_extremes": base * np.where(rng.random((g, d)) < 0.1, 1e4, 1e-6),
        "near_2^-100": base * 2.0**-100,
        "tiny_1e-30": base * 1e-30,
        "tiny_and_huge": np.where(rng.random((g, d)) < 0.01, big, base * 1e-20),
        "alternating": np.where((np.arange(g)[:, None] + np.arange(d)) % 2 == 0, 1.0, -1.0),
        "ramp_ties": (np.arange(g)[:, None] + np.arange(d)[None, :]) % 16 * 0.5,
        "half_steps": (np.arange(g * d).reshape(g, d) % 7) - 3.5,
        "one_hot": np.where((np.arange(g)[:, None] == 9) & (np.arange(d) == 33), 1.0, 0.0),
        "rank_one": np.outer(np.linspace(-3, 3, g), np.linspace(0.01, 100, d)),
    }
    if dtype == "bfloat16":
        tiles["bf16_extremes"] = np.where(rng.random((g, d)) < 0.5, 3e38, -3e38)
        tiles["bf16_large"] = base * 1e6
    out = {name: t.astype(dt) for name, t in tiles.items()}
    nonfinite = base.astype(np.float32)
    nonfinite[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    out["nonfinite"] = nonfinite.astype(dt)
    return out
