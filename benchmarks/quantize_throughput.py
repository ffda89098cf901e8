"""Quantize throughput of the compiled kernels: K+V tile pairs per second.

Run on a CUDA machine, all kernels in one process on the same tiles:

    python benchmarks/quantize_throughput.py --tiles 16384 --json out.json

Each kernel's records are also compared byte for byte with the other kernel's on the
timed batch, and the first tiles with the NumPy oracle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time

import numpy as np

import kvarn_jax  # noqa: F401  (first: sets the exact-CPU XLA flag)
from kvarn import oracle
from kvarn.format import get_preset
from kvarn.tiles import random_tiles

ORACLE_TILES = 64


def _time(fn, reps: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_pallas(k, v, preset, iters, reps, warps):
    import jax
    import jax.numpy as jnp

    from kvarn_jax import pallas_quantize

    kj, vj = jnp.asarray(k), jnp.asarray(v)
    quantize = lambda: pallas_quantize.quantize(kj, vj, preset, iters, num_warps=warps)  # noqa: E731
    seconds = _time(lambda: quantize().block_until_ready(), reps)
    return seconds, np.asarray(quantize()), jax.devices()[0].device_kind


def bench_triton(k, v, preset, iters, reps, warps):
    import torch

    from kvarn.check import _to_torch
    from kvarn_torch import triton_quantize

    kt, vt = _to_torch(k, "cuda"), _to_torch(v, "cuda")
    triton_quantize.NUM_WARPS = warps  # read at launch

    def run():
        triton_quantize.quantize(kt, vt, preset, iters)
        torch.cuda.synchronize()

    seconds = _time(run, reps)
    return seconds, triton_quantize.quantize(kt, vt, preset, iters).cpu().numpy(), \
        torch.cuda.get_device_name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=16384)
    ap.add_argument("--preset", default="kvarn_k4v2_g128")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=oracle.DEFAULT_ITERS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels", nargs="+", default=["pallas", "triton"])
    ap.add_argument("--warps", nargs="+", type=int, default=[8], help="num_warps to try")
    ap.add_argument("--json")
    ap.add_argument("--commit", help="commit measured (default: git rev-parse HEAD)")
    args = ap.parse_args()

    g = get_preset(args.preset).tile
    rng = np.random.default_rng(0)
    k = oracle.rotate(random_tiles(rng, args.tiles, g, args.head_dim, args.dtype))
    v = oracle.rotate(random_tiles(rng, args.tiles, g, args.head_dim, args.dtype))
    expected = oracle.quantize(k[:ORACLE_TILES], v[:ORACLE_TILES], args.preset, args.iters)

    benches = {"pallas": bench_pallas, "triton": bench_triton}
    records, results, device = {}, [], None
    for name in args.kernels:
        for warps in args.warps:
            seconds, rec, device = benches[name](k, v, args.preset, args.iters, args.reps, warps)
            records[name] = rec
            bad = int(np.count_nonzero(rec[:ORACLE_TILES] != expected))
            results.append({"kernel": name, "num_warps": warps, "seconds": seconds,
                            "tile_pairs_per_s": args.tiles / seconds, "oracle_mismatched_bytes": bad})
            print(f"{name:>7} num_warps={warps:<2}: {args.tiles / seconds / 1e6:.3f} M tile pairs/s "
                  f"({seconds * 1e3:.2f} ms for {args.tiles}); oracle mismatched bytes {bad}",
                  flush=True)
    if len(records) == 2:
        a, b = records.values()
        print(f"pallas vs triton mismatched bytes on all {args.tiles} tiles: "
              f"{int(np.count_nonzero(a != b))}")
    if args.json:
        commit = args.commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip() or "unknown"
        with open(args.json, "w") as f:
            json.dump({"benchmark": "quantize_throughput", "device": device,
                       "date": datetime.date.today().isoformat(), "commit": commit,
                       "host": platform.node(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
