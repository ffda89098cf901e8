"""Where a vLLM step's GPU time goes, fp16 vs a kvarn cache: the Qwen3-8B-shaped model of
`vllm_throughput.py`, one burst (default: 16 prompts of 8K tokens, 64 output tokens each)
under torch.profiler in one process (vLLM's engine core runs in-process), the top CUDA
kernels by total time for each cache dtype.

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/vllm_profile.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the profiler sees the engine's kernels

import torch  # noqa: E402
from vllm_throughput import burst, engine  # noqa: E402  (benchmarks/)


def profile(dtype: str, args) -> dict:
    llm = engine("qwen3-8b", dtype, args.max_num_seqs)
    burst(llm, 4, 2048, 8, seed=9)  # warm-up: kernels compiled outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        res = burst(llm, args.requests, args.prompt_len, args.out_len, seed=1)
        torch.cuda.synchronize()
        wall = time.time() - t0
    kernels = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda k: -k[1])
    total = sum(t for _, t, _ in kernels)
    del llm
    return dict(kv_cache_dtype=dtype, wall_s=wall, burst=res, gpu_busy_s=total / 1e6,
                top=[dict(kernel=k[:120], ms=t / 1e3, calls=c, share=t / total)
                     for k, t, c in kernels[:args.top]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--commit", default="")
    ap.add_argument("--dtypes", nargs="+", default=["auto", "kvarn_k4v2_g128"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    results = []
    for dtype in args.dtypes:
        r = profile(dtype, args)
        results.append(r)
        print(f"== {dtype}: wall {r['wall_s']:.2f} s, GPU kernels {r['gpu_busy_s']:.2f} s")
        for k in r["top"]:
            print(f"  {k['ms']:9.1f} ms {100 * k['share']:5.1f}% x{k['calls']:<6} {k['kernel']}")
        gc.collect()  # the engine sits in reference cycles: free its memory for the next
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            benchmark="vllm_profile", device=torch.cuda.get_device_name(),
            date=datetime.date.today().isoformat(), commit=args.commit,
            command="python benchmarks/vllm_profile.py " + " ".join(sys.argv[1:]),
            args=vars(args), results=results), indent=1))


if __name__ == "__main__":
    main()
