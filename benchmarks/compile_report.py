"""Compile the Triton quantize kernel for a GPU target without a GPU and report, per
launch (preset x head_dim x dtype x K/V half): registers, spill stores/loads, stack,
shared memory, SASS instructions of the main loop, barriers in it, compile seconds.

    python benchmarks/compile_report.py [--arch 90] [--warps 8 16] [--presets ...]

`--attention` reports the decode attention kernel instead (k4v2_g128, D=128 or
`--attention-head-dims`, GQA 4, fp16, split): per (rows, block_n, num_warps[, register
cap]) of `--attention-configs`, the same columns, the shared-memory stores in the loop
(`loop_sts`: operands staged for a dot) and the loop's most frequent SASS instructions (the
quantized-tile loop: the one with the most LOP3, which unpack the codes). `--all-kernels`
compiles every kvarn_torch kernel once per kind of launch, a check the tests run
(tests/test_triton_cross_compile.py).
`--pallas-attention` reports the Pallas decode kernel the same way: JAX lowers it for CUDA
(no GPU), its Triton IR is compiled here with this Triton (XLA's bundled Triton may
schedule it differently). `--gluon-attention`: the Gluon kernel of the quantized records
(one warp a program, the loop is one whole record).

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

from kvarn_torch import (  # noqa: E402  (before triton)
    gluon_attention,
    triton_attention,
    triton_gather,
    triton_quantize,
    triton_rotate,
    triton_tiles,
    triton_write,
    warmup,
)
from kvarn_torch.triton_common import KIND_BF16, KIND_FP16, KIND_FP32  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from kvarn.format import HEAD_DIMS, PRESETS, layout  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _opcode(instruction: str) -> str:
    """`@P0 IMAD.MOV.U32 R1, ...` -> `IMAD.MOV.U32` (the predicate dropped)."""
    return re.sub(r"^@!?U?P\w+ ", "", instruction).split()[0]


def _sass_stats(cubin: bytes, loop_op: str | None = None) -> dict:
    """Resources and SASS counts of a cubin. Its main loop: the longest backward branch,
    or with `loop_op` the loop with the most instructions of that opcode."""
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
    loops = []
    for addr, text in ins:
        b = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if b and int(b[1], 16) < addr:
            loops.append([t for a, t in ins if int(b[1], 16) <= a <= addr])
    key = len if loop_op is None else (lambda lp: sum(_opcode(t) == loop_op for t in lp))
    loop = max(loops, key=key, default=[])
    loop_full = collections.Counter(_opcode(t) for t in loop)  # with modifiers
    loop_ops = collections.Counter()
    for op, n in loop_full.items():
        loop_ops[op.split(".")[0]] += n
    return dict(regs=int(m[1]), stack=int(m[2]), spill_st=ops["STL"], spill_ld=ops["LDL"],
                sass=len(ins), loop=len(loop), loop_bar=loop_ops["BAR"],
                loop_shfl=loop_ops["SHFL"], loop_sts=loop_ops["STS"],
                loop_top=loop_full.most_common(8))


def _compiled(src, arch: int, loop_op: str | None = None, **options) -> dict:
    """Compile `src` (an ASTSource or an IR file) for sm_`arch`: shared memory, compile
    seconds and the SASS statistics."""
    start = time.perf_counter()
    k = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return dict(shared=k.metadata.shared, compile_s=round(time.perf_counter() - start, 1),
                **_sass_stats(k.asm["cubin"], loop_op))


def report(preset: str, head_dim: int, bf16: bool, arch: int) -> list[dict]:
    rows = []
    for half, params in zip("KV", triton_quantize.launch_params(preset, head_dim, bf16)):
        params = dict(params)
        options = {"num_warps": params.pop("num_warps"), "num_stages": 1,
                   "maxnreg": params.pop("maxnreg"),
                   "enable_fp_fusion": params.pop("enable_fp_fusion")}
        sig = {"tiles_ptr": "*i16" if bf16 else "*fp16", "out_ptr": "*u8", "iters": "i32"}
        sig |= {name: "constexpr" for name in params}
        aligned = [["tt.divisibility", 16]]  # what a launch with torch tensors specializes
        src = ASTSource(fn=triton_quantize._quantize_kernel, signature=sig, constexprs=params,
                        attrs={(0,): aligned, (1,): aligned})
        rows.append(dict(preset=preset, head_dim=head_dim, dtype="bf16" if bf16 else "fp16",
                         half=half, warps=options["num_warps"],
                         **_compiled(src, arch, **options)))
    return rows


def _record_offsets(preset: str, head_dim: int) -> dict:
    """The record-field constexprs the attention and gather kernels take."""
    lay = layout(preset, head_dim)
    fields = dict(K_CODES=lay.k_codes, A_K=lay.a_k, Z_K=lay.z_k, TAU_K=lay.tau_k,
                  V_CODES=lay.v_codes, SIGMA_V=lay.sigma_v, A_V=lay.a_v, Z_V=lay.z_v)
    return dict(K_BITS=lay.preset.k_bits, V_BITS=lay.preset.v_bits,
                **{name: f.offset for name, f in fields.items()})


def attention_report(rows: int, block_n: int, warps: int, arch: int,
                     maxnreg: int | None = None, split: bool = True,
                     pool_only: bool = False,
                     num_stages: int = triton_attention.NUM_STAGES,
                     head_dim: int = 128, chunk_invariant: bool = False) -> dict:
    """One decode launch of the attention kernel as `triton_attention.attention` makes it
    (pool_only: the Gluon path's launch over the pool blocks; chunk_invariant: the reads
    of vLLM's KVARN_CHUNK_INVARIANT mode)."""
    kernel = triton_attention._attention_kernel
    consts = dict(GROUP=4, ROWS=rows, D=head_dim, LOG_D=head_dim.bit_length() - 1, G=128,
                  BLOCK_N=block_n, CAUSAL=True, SPLIT=split, UPCAST=False,
                  INV_SQRT_D=head_dim ** -0.5, POOL_ONLY=pool_only,
                  CHUNK_INVARIANT=chunk_invariant,
                  **_record_offsets("kvarn_k4v2_g128", head_dim))
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
    return dict(head_dim=head_dim, rows=rows, block_n=block_n, warps=warps, maxnreg=maxnreg,
                split=split, pool_only=pool_only, chunk_invariant=chunk_invariant,
                **_compiled(src, arch, loop_op="LOP3.LUT", num_warps=warps,
                            num_stages=num_stages, maxnreg=maxnreg))


def gluon_attention_report(arch: int) -> dict:
    """The Gluon decode kernel of the quantized records (k4v2_g128, D=128) as
    `gluon_attention.attention` launches it: one warp a program."""
    kernel = gluon_attention._record_kernel
    consts = dict(GROUP=4)
    descs = {name: f"tensordesc<i16[{rows}, 64],{lay!r}>" for name, (rows, lay)
             in zip(("k_desc", "v_desc", "coef_desc", "line_desc"), gluon_attention.BOXES)}
    pointers = dict(q_ptr="*fp16", part_o_ptr="*fp32", part_ml_ptr="*fp32",
                    block_tables_ptr="*i32", seq_lens_ptr="*i32", block_to_slot_ptr="*i32")
    sig = {n: "constexpr" if n in consts else
           descs.get(n) or pointers.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in kernel.arg_names}
    aligned = [["tt.divisibility", 16]]
    attrs = {(i,): aligned for i, n in enumerate(kernel.arg_names)
             if n in pointers or "stride" in n}
    return dict(kernel="_record_kernel",
                **_compiled(GluonASTSource(kernel, sig, consts, attrs), arch, loop_op="LOP3.LUT",
                            num_warps=gluon_attention.NUM_WARPS))


def _compile_one(kernel, types: dict, constexprs: dict, arch: int, **options) -> dict:
    """Compile one launch of `kernel`: `types` names its pointer and float arguments (the
    others are i32), `constexprs` its constexpr arguments."""
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    return dict(kernel=kernel.__name__,
                **_compiled(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), arch,
                            **options))


def kernels_report(arch: int) -> list[dict]:
    """Every Triton kernel of kvarn_torch, compiled once per kind of launch a model of 32/8
    heads x 128 (fp16 and bf16) makes: what Triton's interpreter, which runs them on the
    CPU in the tests, accepts but the GPU compiler would reject shows up here."""
    rows = []
    for rows_, block_n, warps in warmup.attention_variants(32, 8, 128, 128):
        for split in (False, True):
            row = attention_report(rows_, block_n, warps, arch, split=split)
            rows.append(dict(kernel="_attention_kernel", **row))
    rows.append(dict(kernel="_attention_kernel",
                     **attention_report(*triton_attention.launch_config(128, 128, 2048), arch,
                                        chunk_invariant=True)))
    gluon_pool = triton_attention.launch_config(128, 128, 4, gluon_attention.ROWS.value)
    narrow = gluon_attention.NARROW_POOL  # wide batches: loads pipelined by Triton
    rows.append(dict(kernel="_attention_kernel",
                     **attention_report(*gluon_pool, arch, pool_only=True)))
    rows.append(dict(kernel="_attention_kernel",
                     **attention_report(gluon_pool[0], narrow["block_n"], narrow["num_warps"],
                                        arch, pool_only=True, num_stages=narrow["num_stages"])))
    rows.append(_compile_one(
        triton_attention._merge_kernel,
        dict(part_o_ptr="*fp32", part_ml_ptr="*fp32", out_ptr="*fp16"),
        dict(GROUP=4, ROWS=16, D=128, LOG_D=7, INV_SQRT_D=128 ** -0.5,
             SPLIT_CHUNK=triton_attention.MERGE_SPLIT_CHUNK),
        arch, num_warps=triton_attention.MERGE_WARPS))
    rows.append(_compile_one(
        triton_gather._gather_kernel,
        dict(words_ptr="*i32", halves_ptr="*fp16", pool_k_ptr="*fp16", pool_v_ptr="*fp16",
             block_table_ptr="*i32", block_to_slot_ptr="*i32", k_out_ptr="*fp16",
             v_out_ptr="*fp16"),
        dict(D=128, G=128, HK=8, TOKENS=triton_gather.TOKENS,
             **_record_offsets("kvarn_k4v2_g128", 128)),
        arch, num_warps=triton_gather.NUM_WARPS, enable_fp_fusion=False))
    for kind, ty in ((KIND_FP16, "*fp16"), (KIND_BF16, "*i16"), (KIND_FP32, "*fp32")):
        rows.append(_compile_one(
            triton_rotate._rotate_kernel, dict(x_ptr=ty, out_ptr=ty),
            dict(D=128, LOG_D=7, SCALE=128 ** -0.5, KIND=kind,
                 BLOCK_ROWS=triton_rotate.BLOCK_ROWS),
            arch, num_warps=triton_rotate.NUM_WARPS, enable_fp_fusion=False))
        if kind == KIND_FP32:
            continue  # the pool holds the model's dtype
        for heads in (8, 3):
            rows.append(_compile_one(
                triton_write._write_kernel,
                dict(k_ptr=ty, v_ptr=ty, pool_k_ptr=ty, pool_v_ptr=ty,
                     slot_mapping_ptr="*i64", block_to_slot_ptr="*i32", dropped_ptr="*i32"),
                dict(G=128, HEADS=heads, HEADS_P2=triton.next_power_of_2(heads), D=128,
                     LOG_D=7, SCALE=128 ** -0.5, KIND=kind),
                arch, num_warps=triton_write.NUM_WARPS, enable_fp_fusion=False))
    record_words = layout("kvarn_k4v2_g128", 128).record_bytes // 4
    # a flush's fp16 pool tiles (128 tokens x 64 words) and its k4v2_g128 records, D=128
    for gather, unit_rows, cols in ((True, 128, 64), (False, 1, record_words)):
        rows.append(_compile_one(
            triton_tiles._copy_kernel,
            dict(table_ptr="*i64", stacked_ptr="*i32", index_ptr="*i64"),
            dict(ROWS=unit_rows, ROW_BLOCK=triton_tiles.row_block(unit_rows, cols), COLS=cols,
                 COLS_P2=triton.next_power_of_2(cols), GATHER=gather),
            arch, num_warps=triton_tiles.NUM_WARPS))
    for bf16 in (False, True):
        rows += [dict(kernel="_quantize_kernel", **r)
                 for r in report("kvarn_k4v2_g128", 128, bf16, arch)]
    rows.append(gluon_attention_report(arch))
    return rows


def _mlir_string(escaped: str) -> bytes:
    """The bytes of an MLIR string attribute as printed (\\XX hex escapes)."""
    out, i = bytearray(), 0
    while i < len(escaped):
        if escaped[i] == "\\":
            code = escaped[i + 1: i + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", code):
                out.append(int(code, 16))
                i += 3
                continue
            out.append(ord(escaped[i + 1]))
            i += 2
            continue
        out += escaped[i].encode()
        i += 1
    return bytes(out)


def pallas_attention_report(arch: int, head_dim: int = 128) -> dict:
    """The Pallas decode kernel (16 sequences, 32/8 heads, k4v2_g128, fp16, 4 splits) as
    JAX lowers it for CUDA: the Triton IR of its attention custom call (not the merge's),
    compiled here."""
    import kvarn_jax  # noqa: F401  (before jax)
    import jax
    import jax.numpy as jnp
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir as jax_ir

    from kvarn_jax import cache as jcache
    from kvarn_jax import pallas_attention

    cache = jcache.init(64, 8, head_dim, pool_slots=8, dtype=jnp.float16,
                        preset="kvarn_k4v2_g128")
    args = (jnp.zeros((16, 1, 32, head_dim), jnp.float16), cache, jnp.zeros((16, 8), jnp.int32),
            jnp.zeros((16,), jnp.int32))
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                       num_cores=132)
    fn = jax.jit(lambda q, c, bt, sl: pallas_attention.attention(q, c, bt, sl, splits=4,
                                                                 interpret=False))
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=h100)):
        hlo = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # The call's custom calls (attention, merge) each carry their IR, then their name.
    ir = re.search(r'ir = "((?:[^"\\]|\\.)*)", name = "_attention_kernel"', hlo)[1]
    bytecode = _mlir_string(ir)
    ctx = jax_mlir.make_ir_context()
    jax_triton.dialect.register_dialect(ctx)
    with ctx:  # jax's MLIR bytecode -> text that this Triton parses
        text = jax_ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)
    with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
        f.write(text)
        f.flush()
        return dict(kernel="pallas _attention_kernel", head_dim=head_dim,
                    **_compiled(f.name, arch, loop_op="LOP3.LUT",
                                num_warps=pallas_attention.num_warps(head_dim, 128),
                                num_stages=pallas_attention.NUM_STAGES))


def _print_row(row: dict) -> None:
    top = row.pop("loop_top")
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print("   loop:", " ".join(f"{op}={n}" for op, n in top), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", nargs="+", type=int, default=[triton_quantize.NUM_WARPS],
                    help="NUM_WARPS values (per 128 x 128 tile)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--attention", action="store_true", help="the decode attention kernel")
    ap.add_argument("--gluon-attention", action="store_true",
                    help="the Gluon decode kernel of the quantized records")
    ap.add_argument("--pallas-attention", action="store_true",
                    help="the Pallas decode attention kernel, as JAX lowers it for CUDA")
    ap.add_argument("--all-kernels", action="store_true",
                    help="compile every kernel once per kind of launch (a check, see "
                         "kernels_report)")
    ap.add_argument("--attention-configs", nargs="+", default=["16,128,4", "16,64,4", "16,128,8"],
                    help="rows,block_n,num_warps[,max registers] launches to compile with "
                         "--attention")
    ap.add_argument("--attention-head-dims", nargs="+", type=int, default=[128],
                    help="head_dim values of --attention and --pallas-attention (k4v2_g128)")
    args = ap.parse_args()
    if args.all_kernels:
        for row in kernels_report(args.arch):
            row.pop("loop_top")
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        return
    if args.gluon_attention:
        _print_row(gluon_attention_report(args.arch))
        return
    if args.pallas_attention:
        for d in args.attention_head_dims:
            _print_row(pallas_attention_report(args.arch, d))
        return
    if args.attention:
        for d in args.attention_head_dims:
            for config in args.attention_configs:
                rows, block_n, warps, *cap = (int(x) for x in config.split(","))
                if warps > triton_attention.max_warps(d, block_n):
                    continue  # a launch triton_attention.attention refuses
                row = attention_report(rows, block_n, warps, args.arch, *cap, head_dim=d)
                row["warp_instructions_per_128_tokens"] = (
                    row["loop"] * row["warps"] * 128 // row["block_n"])
                _print_row(row)
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
