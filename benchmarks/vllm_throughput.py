"""KV-cache capacity and generation throughput in stock vLLM 0.26: fp16 vs fp8 vs
kvarn_k4v2_g128 on a Qwen3-8B- (or 32B-) shaped model (random weights, `load_format="dummy"`,
token-id prompts), all in one process and run, one engine after another.

Reported per cache dtype: the GPU KV-cache tokens vLLM allocates, and output tokens/s for
(i) a burst of long prompts that does not fit the fp16 cache at once (capacity-bound) and
(ii) a burst of short prompts that does (not capacity-bound). A kvarn dtype with the suffix
`+chunk-invariant` runs the same cache with KVARN_CHUNK_INVARIANT=1, to price that mode
against the default reads in the same run.

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/vllm_throughput.py --json out.json
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
from unittest import mock

import numpy as np
import torch
from plotting import pyplot  # benchmarks/plotting.py

QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
                bos_token_id=151643, eos_token_id=151645)


QWEN3_32B = QWEN3_8B | dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                            num_attention_heads=64)
SHAPES = {"qwen3-8b": QWEN3_8B, "qwen3-32b": QWEN3_32B}
CHUNK_INVARIANT = "+chunk-invariant"  # a --dtypes suffix: settings.ENV_CHUNK_INVARIANT=1


def engine(shape: str, kv_cache_dtype: str, max_num_seqs: int, **overrides):
    """A vLLM engine on the dummy-weight model of `shape` (config written under /tmp),
    decode CUDA graphs, no prefix caching; `overrides` go to vLLM's LLM as they are."""
    from vllm import LLM

    model = Path(f"/tmp/kvarn-{shape}-shape")
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(SHAPES[shape]))
    kw = dict(dtype="bfloat16", enable_prefix_caching=False, seed=0,
              compilation_config=dict(mode=0, cudagraph_mode="FULL_DECODE_ONLY")) | overrides
    return LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True,
               kv_cache_dtype=kv_cache_dtype, max_model_len=16384, max_num_seqs=max_num_seqs,
               **kw)


def burst(llm, n: int, prompt_len: int, out_len: int, seed: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(seed)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(1000, 100000, prompt_len).tolist())
               for _ in range(n)]
    sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t0 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.time() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(requests=n, prompt_len=prompt_len, out_len=out_len, seconds=wall,
                output_tokens=tokens, output_tok_s=tokens / wall)


def plot(results: dict, path: Path) -> None:
    """KV capacity and output throughput of each kv-cache dtype, relative to fp16."""
    plt = pyplot("benchmarks/vllm_throughput.py", path.with_suffix(".json"))
    rows = [r for r in results["results"] if "capacity_vs_fp16" in r]
    if plt is None or not rows:
        return
    def label(b: dict) -> str:
        return f"{b['requests']} x {b['prompt_len']} in, {b['out_len']} out"
    bars = [("KV-cache tokens", lambda r: r["capacity_vs_fp16"], None),
            (f"tok/s, capacity-bound\n{label(rows[0]['capacity_bound'])}",
             lambda r: r["capacity_bound"]["vs_fp16"], 1.3)]
    bars += [(f"tok/s, not capacity-bound\n{label(b)}",
              lambda r, i=i: _short_bursts(r)[i]["vs_fp16"], 1.0)
             for i, b in enumerate(_short_bursts(rows[0]))]
    fig, axes = plt.subplots(1, len(bars), figsize=(4.3 * len(bars), 3.8))
    for ax, (title, value, target) in zip(axes, bars):
        vals = [value(r) for r in rows]
        ax.bar([r["kv_cache_dtype"].replace("auto", "fp16") for r in rows], vals,
               color=["C0", "C1", "C2", "C3"][:len(rows)])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom")
        if target:
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}x (kvarn)")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("vs fp16")
    fig.suptitle(f"vLLM, {results['model']}, TP={results.get('tensor_parallel_size', 1)}, "
                 f"{results['device']} (commit {results['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _short_bursts(row: dict) -> list[dict]:
    """The bursts that fit every cache: the first under its old key, the others after."""
    return [row["not_capacity_bound"]] + row.get("more_not_capacity_bound", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--commit", default="")
    ap.add_argument("--dtypes", nargs="+", default=["auto", "fp8", "kvarn_k4v2_g128"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--long", type=int, nargs=3, default=[48, 8192, 256],
                    metavar=("N", "PROMPT", "OUT"), help="capacity-bound burst")
    ap.add_argument("--short", type=int, nargs=3, action="append",
                    metavar=("N", "PROMPT", "OUT"),
                    help="a burst that fits every cache (repeat for more; default 64 1024 256)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="model dtype (vLLM's FA3 fp8 cache needs bfloat16)")
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a results file")
    args = ap.parse_args()
    args.short = args.short or [[64, 1024, 256]]
    if args.plot_only:
        p = Path(args.plot_only)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        return
    from kvarn_vllm import settings  # the variable as the backend reads it

    results = []
    for name in args.dtypes:
        dtype = name.removesuffix(CHUNK_INVARIANT)
        env = {settings.ENV_CHUNK_INVARIANT: "1"} if name != dtype else {}
        row = dict(kv_cache_dtype=name)
        try:
            # the engine-core process inherits the environment; other entries keep it as given
            with mock.patch.dict(os.environ, env):
                t0 = time.time()
                llm = engine(args.shape, dtype, args.max_num_seqs, dtype=args.dtype,
                             gpu_memory_utilization=args.gpu_memory_utilization,
                             max_num_batched_tokens=args.max_num_batched_tokens,
                             tensor_parallel_size=args.tensor_parallel_size,
                             enforce_eager=args.eager)
                cfg = llm.llm_engine.vllm_config.cache_config
                row.update(startup_s=time.time() - t0, block_size=cfg.block_size,
                           kv_tokens=cfg.num_gpu_blocks * cfg.block_size)
                print(f"{name}: KV tokens {row['kv_tokens']}", flush=True)
                # warm-up: every kernel variant (prefill chunks, decode, splits) compiled
                burst(llm, 8, 2048, 64, seed=9)
                burst(llm, 2, 12000, 16, seed=8)
                row["capacity_bound"] = burst(llm, *args.long, seed=1)
                short = [burst(llm, *b, seed=2 + i) for i, b in enumerate(args.short)]
                row["not_capacity_bound"] = short[0]
                if short[1:]:
                    row["more_not_capacity_bound"] = short[1:]
                print(f"{name}: {row['capacity_bound']['output_tok_s']:.0f} tok/s (long), "
                      + ", ".join(f"{b['output_tok_s']:.0f}" for b in short) + " tok/s (short)",
                      flush=True)
                del llm
        except Exception as e:  # record and go on with the other dtypes
            import traceback
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    base = next((r for r in results if r["kv_cache_dtype"] == "auto" and "error" not in r), None)
    if base:
        for r in results:
            if "error" in r:
                continue
            r["capacity_vs_fp16"] = r["kv_tokens"] / base["kv_tokens"]
            pairs = [(r["capacity_bound"], base["capacity_bound"])]
            pairs += list(zip(_short_bursts(r), _short_bursts(base)))
            for mine, theirs in pairs:
                mine["vs_fp16"] = mine["output_tok_s"] / theirs["output_tok_s"]
            print(f"{r['kv_cache_dtype']:>16}: capacity x{r['capacity_vs_fp16']:.2f}, "
                  f"throughput x{r['capacity_bound']['vs_fp16']:.2f} (long) "
                  + " ".join(f"x{b['vs_fp16']:.2f}" for b in _short_bursts(r)) + " (short)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            benchmark="vllm_throughput", model=f"{args.shape} shape, dummy weights",
            tensor_parallel_size=args.tensor_parallel_size,
            device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
            commit=args.commit,
            command="".join(f"{k}={v} " for k, v in sorted(os.environ.items())
                            if k.startswith("KVARN_"))  # the bridge's knobs
            + "python benchmarks/vllm_throughput.py " + " ".join(sys.argv[1:]),
            args=vars(args), results=results), indent=1))
        plot(json.loads(Path(args.json).read_text()), Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
