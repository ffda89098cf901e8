"""The `kvarn` command: `kvarn demo` (a real model on the KVarN cache), `kvarn info` (presets
and capacity) and `kvarn check` (bit-exactness of every implementation)."""

from __future__ import annotations

import argparse
import sys
import time

from kvarn import oracle
from kvarn.format import DEFAULT_PRESET, HEAD_DIMS, PRESETS, layout


def cmd_info(args: argparse.Namespace) -> int:
    d = args.head_dim
    print(f"KVarN presets at head_dim {d} (fp16 cache: {4 * d} bytes per token per KV head)")
    print(f"{'preset':<18}{'K bits':>7}{'V bits':>7}{'tile':>6}{'record B':>10}"
          f"{'B/token':>9}{'bits/elem':>10}{'vs fp16':>9}")
    for name, p in PRESETS.items():
        lay = layout(name, d)
        bits = lay.bytes_per_token * 8 / (2 * d)
        mark = "  (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<18}{p.k_bits:>7}{p.v_bits:>7}{p.tile:>6}{lay.record_bytes:>10}"
              f"{lay.bytes_per_token:>9.1f}{bits:>10.3f}{lay.capacity_vs_fp16:>8.2f}x{mark}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from kvarn import check

    impls, missing = check.load_implementations(args.frameworks)
    for note in missing:
        print(f"kvarn check: skipped {note}", file=sys.stderr)
    if args.impl:
        impls = [i for i in impls if any(i.name.startswith(s) for s in args.impl)]
    cases = check.all_cases(args.presets, args.dtypes, args.head_dims, args.iters)
    print(f"kvarn check: {len(impls)} implementations ({', '.join(i.name for i in impls)}), "
          f"{len(cases)} cases, {args.tiles} random tiles + the adversarial set each", flush=True)
    total_bad, tiles, failed = 0, 0, []
    pool = check.oracle_pool(args.workers)
    for case in cases:
        start = time.perf_counter()
        try:
            n, result = check.check_case(case, impls, args.tiles, args.seed, pool)
        except Exception as e:  # an implementation that crashes fails the check
            failed.append(f"{case}: {type(e).__name__}: {e}")
            print(f"  {case.preset} {case.dtype} D={case.head_dim}: FAILED {e}", flush=True)
            continue
        tiles += n
        total_bad += sum(result.values())
        detail = " ".join(f"{k}={v}" for k, v in result.items())
        print(f"  {case.preset:<16} {case.dtype:<8} D={case.head_dim:<3} tiles={n:<6} "
              f"mismatched_bytes: {detail}  ({time.perf_counter() - start:.1f}s)", flush=True)
    if pool is not None:
        pool.shutdown()
    for f in failed:
        print(f"kvarn check: failure: {f}", file=sys.stderr)
    print(f"kvarn check: implementations={len(impls)} tiles={tiles} mismatched_bytes={total_bad}")
    return 1 if (total_bad or failed or not impls) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvarn_jax import demo

    return demo.run(args.prompt, args.new_tokens, args.preset, args.score_tokens,
                    args.context_tokens, args.attention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvarn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="presets with bytes per token and capacity vs fp16")
    info.add_argument("--head-dim", type=int, default=128, choices=HEAD_DIMS)
    info.set_defaults(fn=cmd_info)

    demo = sub.add_parser("demo", help="SmolLM2 generating with an fp16 and a KVarN cache, "
                          "capacity, token agreement and perplexity gap (CPU, no network)")
    demo.add_argument("--prompt", default="Explain in two sentences why a language model "
                      "keeps a KV cache.")
    demo.add_argument("--new-tokens", type=int, default=40)
    demo.add_argument("--preset", default="kvarn_k4v2_g64", choices=list(PRESETS),
                      help="SmolLM2's head_dim is 64")
    demo.add_argument("--score-tokens", type=int, default=96)
    demo.add_argument("--context-tokens", type=int, default=160)
    demo.add_argument("--attention", default="reference", choices=["reference", "pallas"],
                      help="attention over the KVarN cache (pallas runs interpreted on a CPU)")
    demo.set_defaults(fn=cmd_demo)

    chk = sub.add_parser("check", help="compare every implementation with the NumPy oracle")
    chk.add_argument("--tiles", type=int, default=8,
                     help="random tiles per case (the adversarial set is always added)")
    chk.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    chk.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                     choices=["float16", "bfloat16"])
    chk.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS),
                     choices=HEAD_DIMS)
    chk.add_argument("--iters", type=int, default=oracle.DEFAULT_ITERS)
    chk.add_argument("--frameworks", nargs="+", default=["jax", "torch"],
                     choices=["jax", "torch"])
    chk.add_argument("--impl", nargs="+", help="only implementations whose name starts so")
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--workers", type=int, default=1,
                     help="processes drawing tiles and computing the oracle (for large --tiles)")
    chk.set_defaults(fn=cmd_check)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
