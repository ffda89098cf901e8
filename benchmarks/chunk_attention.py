"""Multi-query attention over a paged KVarN cache: the chunked-prefill continuation case
(a chunk of a long prompt attending to its whole quantized context), Triton launch
variants side by side with FlashAttention-3 fp16 on the same shapes, one GPU, one run.

    PYTHONPATH=/tmp/vsite:$PWD python benchmarks/chunk_attention.py --json $OUT/chunk.json

Variants: query rows per program (`rows`) x num_warps, and the vLLM bridge's dense path
(`triton_gather` + FlashAttention-3 on rotated queries); each is first checked against
the default launch (and that one against the exact float32 reference on the smallest
shape).
The cache is decode_attention's steady state (k4v2_g128 records, sink and last block in
the pool); the chunk's queries are the last `chunk` positions of the context.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from decode_attention import PRESET, G, build_jax_cache, time_graph, torch_view  # noqa: E402  (benchmarks/)

SHAPES = [(256, 8192), (1024, 8192), (2048, 8192), (2048, 32768)]  # (chunk, context)
HQ, HK, D = 32, 8, 128
VARIANTS = [(32, 4), (32, 8), (64, 4), (64, 8)]


def fa3_chunk(chunk: int, ctx: int) -> float:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    nb = -(-ctx // G)
    k = torch.randn(nb, G, HK, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(chunk, HQ, D, device="cuda", dtype=torch.float16)
    table = torch.randperm(nb, device="cuda", dtype=torch.int32)[None]
    lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
    cu_q = torch.tensor([0, chunk], device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    return time_graph(lambda: flash_attn_varlen_func(
        q, k, v, max_seqlen_q=chunk, cu_seqlens_q=cu_q, max_seqlen_k=ctx, seqused_k=lens,
        causal=True, block_table=table, out=out, fa_version=3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--commit", help="commit measured (default: git rev-parse HEAD)")
    args = ap.parse_args()

    from kvarn_torch import attention_reference
    from kvarn_torch import triton_attention as ta

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    rng = np.random.default_rng(0)
    records = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"benchmark": "chunk_attention", "device": torch.cuda.get_device_name(),
                           "date": datetime.date.today().isoformat(), "commit": commit,
                           "args": vars(args), "results": records}, f, indent=1)

    for chunk, ctx in SHAPES:
        cache, table, lens, _ = build_jax_cache(1, ctx, HK, D, jnp.float16, rng)
        t, tc = torch.from_dlpack, torch_view(cache)  # zero-copy views of the JAX buffers
        tt, tl_ = t(table), t(lens)
        q = t(jax.random.normal(jax.random.key(1), (1, chunk, HQ, D), jnp.float16))
        want = ta.attention(q, tc, tt, tl_).float()
        if (chunk, ctx) == SHAPES[0]:
            exact = attention_reference.attention(q, tc, tt, tl_)
            err = ((want - exact).abs().max() / exact.abs().max()).item()
            print(f"default launch vs exact reference: relative error {err:.1e}", flush=True)
        scale = want.abs().max().item()
        row = dict(chunk=chunk, context=ctx, q_heads=HQ, kv_heads=HK, head_dim=D)
        try:
            us = fa3_chunk(chunk, ctx)
            records.append(row | dict(impl="fa3-fp16", us=us))
            print(f"chunk={chunk:<5} ctx={ctx:<6} fa3-fp16            {us:9.1f} us", flush=True)
        except Exception as e:
            traceback.print_exc()
            records.append(row | dict(impl="fa3-fp16", error=f"{type(e).__name__}: {e}"))
        try:  # the bridge's dense path: gather, rotate q, FlashAttention, rotate back
            from kvarn_torch import codec, triton_gather
            from vllm.vllm_flash_attn import flash_attn_varlen_func

            nb = -(-ctx // G)
            cu_q = torch.tensor([0, chunk], device="cuda", dtype=torch.int32)
            cu_k = torch.tensor([0, ctx - 1], device="cuda", dtype=torch.int32)
            o = torch.empty_like(q[0])

            def dense():
                k, v = triton_gather.gather(tc, tt[0], nb)
                flash_attn_varlen_func(codec.rotate(q[0]), k, v, max_seqlen_q=chunk,
                                       cu_seqlens_q=cu_q, max_seqlen_k=k.shape[0],
                                       cu_seqlens_k=cu_k, causal=True, out=o, fa_version=3)
                return codec.unrotate(o)

            err = ((dense().float() - want[0]).abs().max() / scale).item()
            us = time_graph(dense)
            gather_us = time_graph(lambda: triton_gather.gather(tc, tt[0], nb))
            records.append(row | dict(impl="kvarn-dense", us=us, gather_us=gather_us,
                                      rel_err_vs_default=err))
            print(f"chunk={chunk:<5} ctx={ctx:<6} kvarn-dense         {us:9.1f} us  err "
                  f"{err:.1e} (gather {gather_us:.1f} us)", flush=True)
        except Exception as e:
            traceback.print_exc()
            records.append(row | dict(impl="kvarn-dense", error=f"{type(e).__name__}: {e}"))
        for rows, warps in VARIANTS:
            r = row | dict(impl="kvarn-triton", rows=rows, num_warps=warps)
            try:
                fn = lambda: ta.attention(q, tc, tt, tl_, rows=rows, num_warps=warps)  # noqa: E731
                err = ((fn().float() - want).abs().max() / scale).item()
                us = time_graph(fn)
                r |= dict(us=us, rel_err_vs_default=err)
                print(f"chunk={chunk:<5} ctx={ctx:<6} rows={rows:<3} warps={warps} "
                      f"{us:9.1f} us  err {err:.1e}", flush=True)
            except Exception as e:  # one failing variant must not hide the rest
                traceback.print_exc()
                r |= dict(error=f"{type(e).__name__}: {e}")
            records.append(r)
            save()
        del cache, tc
    save()


if __name__ == "__main__":
    main()
