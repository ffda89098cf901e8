"""Where a vLLM step's GPU time goes, fp16 vs a kvarn cache: the Qwen3-8B-shaped model of
`vllm_throughput.py`, one burst (default: 16 prompts of 8K tokens, 64 output tokens each)
under torch.profiler in one process (vLLM's engine core runs in-process), the top CUDA
kernels by total time for each cache dtype. `--idle` records the host too and names what
the CPU was doing while the GPU sat idle; `--host-syncs` runs the burst once more under
`torch.cuda.set_sync_debug_mode` and lists the call stacks that made the host wait for
the GPU (each one stalls vLLM's overlap of scheduling with the running step).

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/vllm_profile.py --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import datetime
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the profiler sees the engine's kernels

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from vllm_throughput import burst, engine  # noqa: E402  (benchmarks/)


def profile(dtype: str, args) -> dict:
    llm = engine("qwen3-8b", dtype, args.max_num_seqs)
    burst(llm, 4, 2048, 8, seed=9)  # warm-up: kernels compiled outside the profile
    acts = [torch.profiler.ProfilerActivity.CUDA]
    if args.idle:
        acts.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.time()
        res = burst(llm, args.requests, args.prompt_len, args.out_len, seed=1)
        torch.cuda.synchronize()
        wall = time.time() - t0
    kernels = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0 and e.device_type == DeviceType.CUDA),
                     key=lambda k: -k[1])
    total = sum(t for _, t, _ in kernels)
    out = dict(kv_cache_dtype=dtype, wall_s=wall, burst=res, gpu_busy_s=total / 1e6,
               top=[dict(kernel=k[:120], ms=t / 1e3, calls=c, share=t / total)
                    for k, t, c in kernels[:args.top]])
    if args.idle:
        out["idle"] = gpu_idle(prof.events(), args.top)
    if args.host_syncs:
        out["host_syncs"] = host_syncs(llm, args)
    del llm
    return out


def gpu_idle(events, top: int, min_gap_us: float = 20.0) -> dict:
    """GPU idle gaps (no kernel or copy running, >= min_gap_us), the host ranges (ops,
    runtime calls, record_function ranges; nested ones each count) that overlap them, and
    the GPU work on either side of them (which step's launches left the GPU waiting)."""
    gpu = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                 if e.device_type == DeviceType.CUDA)
    gaps, end, last = [], gpu[0][1], gpu[0][2]
    between = collections.Counter()
    for s, e, name in gpu[1:]:
        if s - end >= min_gap_us:
            gaps.append((end, s))
            between[f"{last[:60]} -> {name[:60]}"] += s - end
        if e >= end:
            end, last = e, name
    starts = [a for a, _ in gaps]
    during = collections.Counter()
    for e in events:
        if e.device_type == DeviceType.CUDA:
            continue
        s, t = e.time_range.start, e.time_range.end
        i = max(0, bisect.bisect_right(starts, s) - 1)
        while i < len(gaps) and gaps[i][0] < t:
            during[e.name[:120]] += max(0.0, min(gaps[i][1], t) - max(gaps[i][0], s))
            i += 1
    return dict(gaps=len(gaps), seconds=sum(b - a for a, b in gaps) / 1e6,
                host_during=[dict(name=n, ms=t / 1e3) for n, t in during.most_common(top)
                             if t > 0],
                between=[dict(kernels=n, ms=t / 1e3) for n, t in between.most_common(top)])


def host_syncs(llm, args) -> list[dict]:
    """Run the burst under torch's sync debug mode; -> the distinct call stacks (innermost
    frames outside `warnings`) that synchronized the host with the GPU, most frequent
    first."""
    count = collections.Counter()

    def record(message, *_, **__):
        if "called a synchronizing" not in str(message):  # not the mode's own notice
            return
        frames = [f for f in traceback.extract_stack() if not f.filename.endswith("warnings.py")]
        key = tuple(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-6:-1])
        count[key] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            burst(llm, args.requests, args.prompt_len, args.out_len, seed=3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [dict(calls=n, stack=list(key)) for key, n in count.most_common()]


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
    ap.add_argument("--idle", action="store_true",
                    help="profile the host too: GPU idle time and what the host did then")
    ap.add_argument("--host-syncs", action="store_true",
                    help="run the burst again under torch's sync debug mode, list syncs")
    args = ap.parse_args()
    results = []
    for dtype in args.dtypes:
        r = profile(dtype, args)
        results.append(r)
        print(f"== {dtype}: wall {r['wall_s']:.2f} s, GPU kernels {r['gpu_busy_s']:.2f} s")
        for k in r["top"]:
            print(f"  {k['ms']:9.1f} ms {100 * k['share']:5.1f}% x{k['calls']:<6} {k['kernel']}")
        if "idle" in r:
            idle = r["idle"]
            print(f"  GPU idle {idle['seconds']:.3f} s in {idle['gaps']} gaps; host meanwhile:")
            for h in idle["host_during"]:
                print(f"  {h['ms']:9.1f} ms  {h['name']}")
            print("  GPU idle between (last kernel -> next kernel):")
            for h in idle["between"]:
                print(f"  {h['ms']:9.1f} ms  {h['kernels']}")
        for sync in r.get("host_syncs", []):
            print(f"  host sync x{sync['calls']}: " + " <- ".join(reversed(sync["stack"])))
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
