"""Reconstruction error on synthetic K/V with outliers: KVarN vs RTN baselines, same bits.

Keys get outlier channels (a few channels 10-50x larger, as after RoPE in real models),
values get token-scale outliers (a few tokens 20x larger, e.g. attention sinks). Each
method quantizes 128-token tiles of one head at the preset's bits (K 4 / V 2):

* kvarn:           Hadamard + variance normalization (8 iterations) + RTN (the codec);
* hadamard+rtn:    the same without normalization (the codec with 0 iterations);
* per-token rtn:   asymmetric min/max RTN per token for K and V (no rotation);
* kivi:            per-channel K over the tile, per-token V (KIVI's orientation).

Scales and zeros of the baselines are stored as fp16, like KVarN's. Printed per method:
relative Frobenius error and the worst token's relative error, for K and V.

    python benchmarks/reconstruction_error.py --json benchmarks/results/reconstruction_error.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kvarn import oracle

PRESET = "kvarn_k4v2_g128"
K_BITS, V_BITS, TILE = 4, 2, 128


def synthetic_kv(rng: np.random.Generator, tiles: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    t = tiles * TILE
    channel = np.ones(d)
    outliers = rng.choice(d, 6, replace=False)
    channel[outliers] = rng.uniform(10, 50, 6)
    k = rng.standard_normal((t, d)) * channel + rng.standard_normal(d) * 2
    token = np.ones((t, 1))
    token[rng.choice(t, t // 50, replace=False)] = 20.0
    token[::TILE * 8] = 40.0  # a sink-like token now and then
    v = rng.standard_t(5, (t, d)) * token * rng.lognormal(0, 0.3, (1, d))
    return k.astype(np.float16), v.astype(np.float16)


def rtn_rows(x: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min/max RTN along the last axis with fp16 scale and zero."""
    lo = x.min(-1, keepdims=True)
    delta = np.maximum((x.max(-1, keepdims=True) - lo) / ((1 << bits) - 1), 1e-10)
    q = np.clip(np.rint((x - lo) / delta), 0, (1 << bits) - 1)
    return q * delta.astype(np.float16).astype(np.float32) + lo.astype(np.float16).astype(np.float32)


def kvarn_codec(k: np.ndarray, v: np.ndarray, iters: int):
    d = k.shape[-1]
    kt, vt = k.reshape(-1, TILE, d), v.reshape(-1, TILE, d)
    rec = oracle.quantize(oracle.rotate(kt), oracle.rotate(vt), PRESET, iters)
    k_hat, v_hat = oracle.dequantize(rec, PRESET, d)
    return oracle.rotate(k_hat).reshape(k.shape), oracle.rotate(v_hat).reshape(v.shape)


def per_token(k, v):
    return rtn_rows(k.astype(np.float32), K_BITS), rtn_rows(v.astype(np.float32), V_BITS)


def kivi(k, v):
    d = k.shape[-1]
    kt = np.swapaxes(k.astype(np.float32).reshape(-1, TILE, d), 1, 2)  # channels x tokens
    k_hat = np.swapaxes(rtn_rows(kt, K_BITS), 1, 2).reshape(k.shape)
    return k_hat, rtn_rows(v.astype(np.float32), V_BITS)


METHODS = {
    "kvarn": lambda k, v: kvarn_codec(k, v, oracle.DEFAULT_ITERS),
    "hadamard+rtn": lambda k, v: kvarn_codec(k, v, 0),
    "per-token rtn": per_token,
    "kivi": kivi,
}


def errors(x: np.ndarray, x_hat: np.ndarray) -> tuple[float, float]:
    x = x.astype(np.float64)
    diff = x_hat - x
    frob = np.linalg.norm(diff) / np.linalg.norm(x)
    worst = np.max(np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-12))
    return float(frob), float(worst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=64, help="128-token tiles per head")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    heads = [synthetic_kv(rng, args.tiles, args.head_dim) for _ in range(args.heads)]
    rows = []
    print(f"{'method':<15}{'K rel frob':>12}{'K worst tok':>13}{'V rel frob':>12}{'V worst tok':>13}")
    for name, method in METHODS.items():
        errs = np.array([errors(k, kh) + errors(v, vh)
                         for k, v in heads for kh, vh in [method(k, v)]]).mean(0)
        rows.append({"method": name, "k_rel_frobenius": errs[0], "k_worst_token": errs[1],
                     "v_rel_frobenius": errs[2], "v_worst_token": errs[3]})
        print(f"{name:<15}{errs[0]:>12.4f}{errs[1]:>13.4f}{errs[2]:>12.4f}{errs[3]:>13.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "reconstruction_error", "preset": PRESET,
                       "args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
