"""Paged decode attention on one GPU, all implementations in one process on the same shapes:
KVarN Triton and Gluon (torch; Gluon at D=128 only), KVarN Pallas and Mosaic GPU (JAX;
Mosaic at D=128 only), FlashAttention-3
fp16 and fp8 from vLLM 0.26, and the time to commit the tiles one decode step completes
(B blocks x Hk heads; once per batch, heads and D: it does not depend on the context).

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/decode_attention.py --json out.json

`--sweep` instead times the Triton kernel's launch knobs (block_n x num_warps x register
cap x splits) side by side on 16 x 32K and 1 x 4K (32/8 heads, D=128), each variant first
checked against the exact float32 reference (1 x 4K) or the default variant (16 x 32K):

    python benchmarks/decode_attention.py --sweep --json $OUT/sweep.json

Steady-state cache: every sequence holds its sink block and its partial last block in the
tail pool, every other block quantized (k4v2_g128 records). Torch calls are timed as CUDA
graph replays; JAX calls as a jitted program of REPS calls, its kernels' span on the GPU
over REPS (see `time_jax`). Effective TB/s counts the bytes each kernel must read: K/V records or
fp16/fp8 pages, pool blocks, queries and outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import kvarn_jax  # noqa: E402,F401  (before jax)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvarn.format import layout  # noqa: E402
from kvarn_jax import cache as jcache  # noqa: E402
from kvarn_jax import pallas_attention, pallas_quantize  # noqa: E402
from plotting import pyplot  # noqa: E402  (benchmarks/plotting.py)

PRESET = "kvarn_k4v2_g128"
G = 128
REPS = 20
DISTINCT_TILES = 256


def shapes(args):
    out = []
    for hq, hk in ((32, 8), (9, 3)):
        for d in (128, 64):
            for b in args.batches or (1, 16, 64):
                for ctx in (4096, 16384, 32768):
                    out.append((b, ctx, hq, hk, d))
            out.append((1, 131072, hq, hk, d))
    if args.quick:
        out = [s for s in out if s[2] == 32 and s[4] == 128
               and (args.batches or s[0] in (1, 16))]
    if args.batches:
        out = [s for s in out if s[0] in args.batches]
    if args.contexts:
        out = [s for s in out if s[1] in args.contexts]
    if args.heads:
        out = [s for s in out if f"{s[2]}/{s[3]}" in args.heads]
    if args.head_dims:
        out = [s for s in out if s[4] in args.head_dims]
    return out


def build_jax_cache(b, ctx, hk, d, dtype, rng):
    """Blocks of sequence i: i*nb .. i*nb+nb-1 (shuffled); sink and last block in the pool."""
    nb = -(-ctx // G)
    lay = layout(PRESET, d)
    key = jax.random.key(int(rng.integers(1 << 30)))
    kt = jax.random.normal(key, (DISTINCT_TILES, G, d), dtype)
    recs = pallas_quantize.quantize(kt, kt[::-1], PRESET)  # realistic record contents
    n_blocks = b * nb
    idx = (jnp.arange(n_blocks * hk) % DISTINCT_TILES).reshape(n_blocks, hk)
    pages = recs[idx]
    table = rng.permutation(n_blocks).astype(np.int32).reshape(b, nb)
    pool_blocks = np.stack([table[:, 0], table[:, -1]], 1).reshape(-1)
    b2s = np.full(n_blocks, -1, np.int32)
    b2s[pool_blocks] = np.arange(2 * b, dtype=np.int32)
    pool = jax.random.normal(key, (2 * b, G, hk, d), dtype)
    cache = jcache.KVarNCache(
        pages=pages, pool_k=pool, pool_v=pool * 0.5, block_to_slot=jnp.asarray(b2s),
        slot_to_block=jnp.asarray(pool_blocks.astype(np.int32)),
        dropped_tokens=jnp.zeros((), jnp.int32), preset=PRESET, sink_blocks=1, iters=8)
    lens = np.full(b, ctx - 1, np.int32)  # the last block is partial
    return cache, jnp.asarray(table), jnp.asarray(lens), lay


def torch_view(cache):
    """The Triton kernels' cache over the same GPU buffers as the JAX cache (zero-copy)."""
    from kvarn_torch import cache as tcache

    t = torch.from_dlpack
    return tcache.KVarNCache(
        pages=t(cache.pages), pool_k=t(cache.pool_k), pool_v=t(cache.pool_v),
        block_to_slot=t(cache.block_to_slot), slot_to_block=t(cache.slot_to_block),
        dropped_tokens=torch.zeros((), dtype=torch.int32, device="cuda"),
        preset=cache.preset, sink_blocks=cache.sink_blocks, iters=cache.iters)


def best_us(run, tries: int = 3) -> float:
    """The shortest of `tries` timings of run() (it waits for its own work), microseconds
    between CUDA events on torch's current stream."""
    best = float("inf")
    for _ in range(tries):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3)
    return best


def time_jax(fn, q):
    """Microseconds of one fn(q) call in steady state, on the GPU's clock: a jitted program
    of REPS calls back to back (unrolled, each call's output the next one's query: no op
    besides them), the span from its first kernel's start to its last kernel's end as
    CUPTI records it (torch.profiler sees JAX's kernels too), over REPS; the best of 3.
    As with a CUDA-graph replay, the host's dispatch before the first kernel is not
    counted (a wall-clock difference of 2 x REPS and REPS calls, used before, varied by
    +-5-10 us per call at small shapes; results/pallas_timing_h200.txt)."""
    def run(q):
        for _ in range(REPS):
            q = fn(q)
        return q

    run = jax.jit(run)
    run(q).block_until_ready()
    best = float("inf")
    for _ in range(3):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(q).block_until_ready()
        spans = [e.time_range for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
        if not spans:
            raise RuntimeError("CUPTI recorded no kernel of the JAX program")
        best = min(best, (max(t.end for t in spans) - min(t.start for t in spans)) / REPS)
    return best


def time_graph(fn):
    """Mean microseconds of one CUDA-graph replay of fn()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return best_us(graph.replay) / REPS


def fa3(b, ctx, hq, hk, d, fp8):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    nb = -(-ctx // G)
    dt = torch.float16
    k = torch.randn(b * nb, G, hk, d, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(b, hq, d, device="cuda", dtype=dt)
    table = torch.randperm(b * nb, device="cuda", dtype=torch.int32).reshape(b, nb)
    lens = torch.full((b,), ctx - 1, device="cuda", dtype=torch.int32)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    out = torch.empty(b, hq, d, device="cuda", dtype=torch.bfloat16 if fp8 else dt)
    extra = {}
    if fp8:
        k, v, q = (x.to(torch.float8_e4m3fn) for x in (k, v, q))
        ones = torch.ones(b, hk, device="cuda", dtype=torch.float32)
        extra = dict(q_descale=ones, k_descale=ones, v_descale=ones)
    call = lambda: flash_attn_varlen_func(  # noqa: E731
        q, k, v, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=ctx, seqused_k=lens,
        causal=True, block_table=table, out=out, fa_version=3, **extra)
    us = time_graph(call)
    elem = 1 if fp8 else 2
    nbytes = b * (ctx - 1) * hk * d * 2 * elem + 2 * b * hq * d * 2
    return us, nbytes


def kvarn_bytes(b, ctx, hk, d, hq, lay):
    nb = -(-ctx // G)
    return b * hk * ((nb - 2) * lay.record_bytes + 2 * G * d * 2 * 2) + 2 * b * hq * d * 2


def sweep(args) -> None:
    """Time Triton launch variants on the two headline shapes (see the module doc)."""
    from kvarn_torch import attention_reference
    from kvarn_torch import triton_attention as ta

    rng = np.random.default_rng(0)
    records = []
    for (b, ctx) in ((16, 32768), (1, 4096)):
        hq, hk, d = 32, 8, 128
        cache, table, lens, lay = build_jax_cache(b, ctx, hk, d, jnp.float16, rng)
        t, tc = torch.from_dlpack, torch_view(cache)
        tq = t(jax.random.normal(jax.random.key(1), (b, 1, hq, d), jnp.float16))
        tt, tl_ = t(table), t(lens)
        kb = kvarn_bytes(b, ctx, hk, d, hq, lay)
        programs = b * hk
        sms = ta._num_sms(tq.device)
        auto = ta.num_splits(programs, table.shape[1] * 2, sms)  # centre of the choices
        if b == 1:
            want = attention_reference.attention(tq, tc, tt, tl_)
        else:
            want = ta.attention(tq, tc, tt, tl_).float()  # the default launch
        scale = want.abs().max().item()
        split_choices = sorted({1, max(1, auto // 2), auto, 2 * auto} if b == 1
                               else {1, auto, 2 * auto, 4 * auto})
        for block_n, warps, regs, splits in itertools.product(
                args.block_n, args.warps, args.max_registers, split_choices):
            row = dict(batch=b, context=ctx, q_heads=hq, kv_heads=hk, head_dim=d,
                       impl="kvarn-triton", block_n=block_n, num_warps=warps,
                       max_registers=regs or None,
                       splits=splits,  # what a default launch would pick:
                       auto_splits=ta.num_splits(programs,
                                                 table.shape[1] * G // block_n, sms))
            try:
                fn = lambda: ta.attention(tq, tc, tt, tl_, splits=splits,  # noqa: E731
                                          block_n=block_n, num_warps=warps,
                                          max_registers=regs or None)
                err = ((fn().float() - want).abs().max() / scale).item()
                us = time_graph(fn)
                row |= dict(us=us, bytes=kb, tb_s=kb / us / 1e6, rel_err=err)
                print(f"B={b:<3} ctx={ctx:<6} block_n={block_n:<4} warps={warps} "
                      f"regs<={regs or '-':<4} splits={splits:<3} {us:8.1f} us "
                      f"{kb / us / 1e6:5.2f} TB/s err {err:.1e}", flush=True)
            except Exception as e:  # one failing variant must not hide the rest
                traceback.print_exc()
                row |= dict(error=f"{type(e).__name__}: {e}")
            records.append(row)
            save(args, records)
        del cache


def plot(results: dict, path: Path) -> None:
    """Time vs context per implementation, one panel per (batch, heads, head_dim)."""
    plt = pyplot("benchmarks/decode_attention.py", path.with_suffix(".json"))
    if plt is None:
        return
    panels: dict = {}
    for r in results["results"]:
        if "us" in r and "block_n" not in r:
            key = (r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"])
            panels.setdefault(key, {}).setdefault(r["impl"], []).append((r["context"], r["us"]))
    if not panels:
        return
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    # one colour per implementation in every panel
    names = sorted({impl for impls in panels.values() for impl in impls})
    colour = {impl: f"C{i}" for i, impl in enumerate(names)}
    for ax, (key, impls) in zip(axes.flat, sorted(panels.items())):
        for impl, pts in sorted(impls.items()):
            pts.sort()
            ax.plot([c for c, _ in pts], [u for _, u in pts], marker="o", label=impl,
                    color=colour[impl])
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="us",
               title=f"B={key[0]}, {key[1]}/{key[2]} heads, D={key[3]}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"paged decode attention, {results['device']}, {results['preset']} "
                 f"(commit {results['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def save(args, records) -> None:
    """Write the JSON so far: a run cut short by a time limit keeps what it measured."""
    if not args.json:
        return
    commit_id = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
        json.dump({"benchmark": "decode_attention", "preset": PRESET,
                   "device": torch.cuda.get_device_name(),
                   "date": datetime.date.today().isoformat(), "commit": commit_id,
                   "command": "python " + " ".join(sys.argv),
                   "reps": REPS, "results": records}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="32/8 heads, D=128, batch 1 and 16")
    ap.add_argument("--commit", help="commit measured")
    ap.add_argument("--batches", type=int, nargs="+",
                    help="batch sizes to run instead of 1, 16, 64 (with --quick: of 32/8, D=128)")
    ap.add_argument("--contexts", type=int, nargs="+",
                    help="only these of the contexts 4096, 16384, 32768, 131072 (batch 1)")
    ap.add_argument("--heads", nargs="+", help="only these of 32/8 and 9/3 (query/KV heads)")
    ap.add_argument("--head-dims", type=int, nargs="+", help="only these of 128 and 64")
    ap.add_argument("--impls", nargs="+",
                    default=["kvarn-triton", "kvarn-gluon", "kvarn-pallas", "kvarn-mosaic",
                             "fa3-fp16", "fa3-fp8", "commit", "commit-triton"])
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a results file")
    ap.add_argument("--sweep", action="store_true",
                    help="time the Triton kernel's launch knobs instead (see the module doc)")
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128],
                    help="tokens per tile tried by --sweep")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8],
                    help="warps per program tried by --sweep")
    ap.add_argument("--max-registers", type=int, nargs="+", default=[0],
                    help="per-thread register caps tried by --sweep (0: none)")
    args = ap.parse_args()
    if args.plot_only:
        p = Path(args.plot_only)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        return
    if args.sweep:
        sweep(args)
        return
    rng = np.random.default_rng(0)
    records = []
    committed = set()  # a commit's time depends on B, heads and D, not on the context
    for (b, ctx, hq, hk, d) in shapes(args):
        dt = jnp.float16
        cache, table, lens, lay = build_jax_cache(b, ctx, hk, d, dt, rng)
        q = jax.random.normal(jax.random.key(1), (b, 1, hq, d), dt)
        kb = kvarn_bytes(b, ctx, hk, d, hq, lay)
        row = dict(batch=b, context=ctx, q_heads=hq, kv_heads=hk, head_dim=d)

        def record(impl, fn):
            if impl not in args.impls:
                return
            try:
                us, nbytes = fn()
                records.append(row | dict(impl=impl, us=us, bytes=nbytes, tb_s=nbytes / us / 1e6))
                print(f"{impl:>13} B={b:<3} ctx={ctx:<6} {hq}/{hk} D={d:<3} {us:9.1f} us "
                      f"{nbytes / us / 1e6:6.2f} TB/s", flush=True)
            except Exception as e:  # record and go on: one failing impl must not hide the rest
                traceback.print_exc()
                records.append(row | dict(impl=impl, error=f"{type(e).__name__}: {e}"))
            save(args, records)

        record("kvarn-pallas", lambda: (time_jax(
            lambda qq: pallas_attention.attention(qq, cache, table, lens), q), kb))

        def mosaic():
            from kvarn_jax import mosaic_attention

            got = mosaic_attention.attention(q, cache, table, lens).astype(jnp.float32)
            want = pallas_attention.attention(q, cache, table, lens).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            if err > 2e-2:  # both kernels err ~3e-3 from exact attention
                raise AssertionError(f"Mosaic vs Pallas outputs differ by {err:.1e}")
            return time_jax(lambda qq: mosaic_attention.attention(qq, cache, table, lens), q), kb

        if d == 128:  # its scope (the module doc)
            record("kvarn-mosaic", mosaic)

        def triton():
            from kvarn_torch import triton_attention

            t, tc = torch.from_dlpack, torch_view(cache)
            tq, tt, tl = t(q), t(table), t(lens)
            return time_graph(lambda: triton_attention.attention(tq, tc, tt, tl)), kb

        record("kvarn-triton", triton)

        def gluon():
            from kvarn_torch import gluon_attention, triton_attention

            t, tc = torch.from_dlpack, torch_view(cache)
            tq, tt, tl = t(q), t(table), t(lens)
            got = gluon_attention.attention(tq, tc, tt, tl).float()
            want = triton_attention.attention(tq, tc, tt, tl).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:  # both kernels err ~3e-3 from exact attention
                raise AssertionError(f"Gluon vs Triton outputs differ by {err:.1e}")
            return time_graph(lambda: gluon_attention.attention(tq, tc, tt, tl)), kb

        if d == 128:  # its scope (the module doc); 32/8 and 9/3 heads are GQA <= 8
            record("kvarn-gluon", gluon)
        record("fa3-fp16", lambda: fa3(b, ctx, hq, hk, d, fp8=False))
        record("fa3-fp8", lambda: fa3(b, ctx, hq, hk, d, fp8=True))

        def commit():
            # One decode step completes one block per sequence: quantize B x Hk tiles from
            # the pool and write their records.
            tiles = jax.random.normal(jax.random.key(2), (b * hk, G, d), dt)
            pages = jnp.copy(cache.pages)  # donated below; commit-triton still reads the cache

            @jax.jit
            def step(pages):
                recs = pallas_quantize.quantize(tiles, tiles, PRESET).reshape(b, hk, -1)
                return pages.at[table[:, 1]].set(recs)

            def loop(p):
                return jax.lax.fori_loop(0, REPS, lambda _, x: step(x), p)

            fn = jax.jit(loop, donate_argnums=0)
            pages = fn(pages)
            pages.block_until_ready()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pages = fn(pages)
            pages.block_until_ready()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e3 / REPS, b * hk * (2 * G * d * 2 + lay.record_bytes)

        def commit_triton():
            from kvarn_torch import triton_quantize

            tiles = torch.randn(b * hk, G, d, device="cuda", dtype=torch.float16)
            pages = torch.from_dlpack(cache.pages).view(-1, hk, lay.record_bytes)
            dst = torch.from_dlpack(table[:, 1]).long()

            def step():
                recs = triton_quantize.quantize(tiles, tiles, PRESET).view(b, hk, -1)
                pages.index_copy_(0, dst, recs)

            return time_graph(step), b * hk * (2 * G * d * 2 + lay.record_bytes)

        if (b, hq, hk, d) not in committed:
            committed.add((b, hq, hk, d))
            record("commit", commit)
            record("commit-triton", commit_triton)
        del cache

    save(args, records)
    if args.json:
        plot(json.loads(Path(args.json).read_text()), Path(args.json).with_suffix(".png"))

if __name__ == "__main__":
    main()
