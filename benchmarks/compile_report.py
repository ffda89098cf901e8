"""Compile the Triton quantize kernel for a GPU target without a GPU and report, per
launch (preset x head_dim x dtype x K/V half): registers, spill stores/loads, stack,
shared memory, SASS instructions of the main loop, barriers in it, compile seconds.

    python benchmarks/compile_report.py [--arch 90] [--warps 8 16] [--presets ...]

`--attention` reports the decode attention kernel instead (k4v2_g128, D=128, GQA 4, fp16,
split): per (rows, block_n, num_warps) of `--attention-configs`, the same columns and the
loop's most frequent SASS instructions (its longest backward branch: the tile loop).

Uses Triton's own ptxas / cuobjdump and an empty Triton cache (cold compiles). Imports
Triton compiled (TRITON_INTERPRET=0), so run it in its own process.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # a real JITFunction even without a GPU
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvarn_compile_report_")  # cold

from kvarn_torch import triton_attention, triton_quantize  # noqa: E402  (before triton)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from kvarn.format import HEAD_DIMS, PRESETS, layout  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _opcode(instruction: str) -> str:
    """`@P0 IMAD.MOV.U32 R1, ...` -> `IMAD.MOV.U32` (the predicate dropped)."""
    return re.sub(r"^@!?U?P\w+ ", "", instruction).split()[0]


def _sass_stats(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name],
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ins = [(int(a, 16), t.strip()) for a, t in
           re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    ops = collections.Counter(_opcode(t).split(".")[0] for _, t in ins)
    loop = []  # the longest backward branch: the normalization loop
    for addr, text in ins:
        b = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if b and int(b[1], 16) < addr and addr - int(b[1], 16) > 16 * len(loop):
            loop = [t for a, t in ins if int(b[1], 16) <= a <= addr]
    loop_full = collections.Counter(_opcode(t) for t in loop)  # with modifiers
    loop_ops = collections.Counter()
    for op, n in loop_full.items():
        loop_ops[op.split(".")[0]] += n
    return dict(regs=int(m[1]), stack=int(m[2]), spill_st=ops["STL"], spill_ld=ops["LDL"],
                sass=len(ins), loop=len(loop), loop_bar=loop_ops["BAR"],
                loop_shfl=loop_ops["SHFL"], loop_top=loop_full.most_common(8))


def report(preset: str, head_dim: int, bf16: bool, arch: int) -> list[dict]:
    rows = []
    for half, params in zip("KV", triton_quantize.launch_params(preset, head_dim, bf16)):
        params = dict(params)
        options = {"num_warps": params.pop("num_warps"), "num_stages": 1,
                   "enable_fp_fusion": params.pop("enable_fp_fusion")}
        sig = {"tiles_ptr": "*i16" if bf16 else "*fp16", "out_ptr": "*u8", "iters": "i32"}
        sig |= {name: "constexpr" for name in params}
        aligned = [["tt.divisibility", 16]]  # what a launch with torch tensors specializes
        src = ASTSource(fn=triton_quantize._quantize_kernel, signature=sig, constexprs=params,
                        attrs={(0,): aligned, (1,): aligned})
        start = time.perf_counter()
        k = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        seconds = time.perf_counter() - start
        rows.append(dict(preset=preset, head_dim=head_dim, dtype="bf16" if bf16 else "fp16",
                         half=half, warps=options["num_warps"], shared=k.metadata.shared,
                         compile_s=round(seconds, 1), **_sass_stats(k.asm["cubin"])))
    return rows


def attention_report(rows: int, block_n: int, warps: int, arch: int,
                     maxnreg: int | None = None) -> dict:
    """One decode launch of the attention kernel as `triton_attention.attention` makes it."""
    kernel = triton_attention._attention_kernel
    lay = layout("kvarn_k4v2_g128", 128)
    fields = dict(K_CODES=lay.k_codes, A_K=lay.a_k, Z_K=lay.z_k, TAU_K=lay.tau_k,
                  V_CODES=lay.v_codes, SIGMA_V=lay.sigma_v, A_V=lay.a_v, Z_V=lay.z_v)
    consts = dict(GROUP=4, ROWS=rows, D=128, LOG_D=7, G=128, BLOCK_N=block_n, K_BITS=4,
                  V_BITS=2, CAUSAL=True, SPLIT=True, UPCAST=False,
                  INV_SQRT_D=128 ** -0.5,
                  **{name: f.offset for name, f in fields.items()})
    pointers = dict(q_ptr="*fp16", out_ptr="*fp16", part_o_ptr="*fp32", part_ml_ptr="*fp32",
                    words_ptr="*i32", halves_ptr="*fp16", pool_k_ptr="*fp16",
                    pool_v_ptr="*fp16", block_tables_ptr="*i32", seq_lens_ptr="*i32",
                    query_lens_ptr="*i32", block_to_slot_ptr="*i32")
    sig, attrs = {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            if name not in triton_attention._SLICED_POINTERS:
                attrs[(i,)] = aligned
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
            if "stride" in name and name not in triton_attention._RUNTIME_INTS:
                attrs[(i,)] = aligned  # every stride of a serving launch is a multiple of 16
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    start = time.perf_counter()
    k = compile(src, target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": triton_attention.NUM_STAGES,
                         "maxnreg": maxnreg})
    return dict(rows=rows, block_n=block_n, warps=warps, maxnreg=maxnreg,
                shared=k.metadata.shared,
                compile_s=round(time.perf_counter() - start, 1), **_sass_stats(k.asm["cubin"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", nargs="+", type=int, default=[triton_quantize.NUM_WARPS],
                    help="NUM_WARPS values (per 128 x 128 tile)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--attention", action="store_true", help="the decode attention kernel")
    ap.add_argument("--attention-configs", nargs="+", default=["16,128,4", "16,64,4", "16,128,8"],
                    help="rows,block_n,num_warps[,max registers] launches to compile with "
                         "--attention")
    args = ap.parse_args()
    if args.attention:
        for config in args.attention_configs:
            rows, block_n, warps, *cap = (int(x) for x in config.split(","))
            row = attention_report(rows, block_n, warps, args.arch, *cap)
            top = row.pop("loop_top")
            per_tile = row["loop"] * row["warps"] * 128 // row["block_n"]
            print(" ".join(f"{k}={v}" for k, v in row.items()),
                  f"warp_instructions_per_128_tokens={per_tile}", flush=True)
            print("   loop:", " ".join(f"{op}={n}" for op, n in top), flush=True)
        return
    cols = ["preset", "head_dim", "dtype", "half", "warps", "regs", "spill_st", "spill_ld",
            "stack", "shared", "sass", "loop", "loop_bar", "loop_shfl", "compile_s"]
    print(" ".join(f"{c:>8}" if c != "preset" else f"{c:<16}" for c in cols), flush=True)
    for warps in args.warps:
        triton_quantize.NUM_WARPS = warps
        for preset in args.presets:
            for d in args.head_dims:
                for dtype in args.dtypes:
                    for row in report(preset, d, dtype == "bf16", args.arch):
                        print(" ".join(f"{row[c]:>8}" if c != "preset" else f"{row[c]:<16}"
                                       for c in cols), flush=True)


if __name__ == "__main__":
    main()
