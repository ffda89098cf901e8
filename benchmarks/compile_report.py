"""Compile the Triton quantize kernel for a GPU target without a GPU and report, per
launch (preset x head_dim x dtype x K/V half): registers, spill stores/loads, stack,
shared memory, SASS instructions of the main loop, barriers in it, compile seconds.

    python benchmarks/compile_report.py [--arch 90] [--warps 8 16] [--presets ...]

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

from kvarn_torch import triton_quantize  # noqa: E402  (before triton: kvarn_torch checks)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from kvarn.format import HEAD_DIMS, PRESETS  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


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
    ops = collections.Counter(re.sub(r"^@!?U?P\w+ ", "", t).split()[0].split(".")[0]
                              for _, t in ins)
    loop = []  # the longest backward branch: the normalization loop
    for addr, text in ins:
        b = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if b and int(b[1], 16) < addr and addr - int(b[1], 16) > 16 * len(loop):
            loop = [t for a, t in ins if int(b[1], 16) <= a <= addr]
    loop_ops = collections.Counter(re.sub(r"^@!?U?P\w+ ", "", t).split()[0].split(".")[0]
                                   for t in loop)
    return dict(regs=int(m[1]), stack=int(m[2]), spill_st=ops["STL"], spill_ld=ops["LDL"],
                sass=len(ins), loop=len(loop), loop_bar=loop_ops["BAR"],
                loop_shfl=loop_ops["SHFL"])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", nargs="+", type=int, default=[triton_quantize.NUM_WARPS],
                    help="NUM_WARPS values (per 128 x 128 tile)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    args = ap.parse_args()
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
