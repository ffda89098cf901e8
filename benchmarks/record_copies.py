"""How fast the quantized records of a decode batch stream into shared memory on this GPU,
with no computation: the Gluon decode kernel's own TMA copies
(`gluon_attention._copy_record`, two stages, an mbarrier each) against per-lane 16-byte
`cp.async` pieces in global order (two stages), on the kernel's grid and block tables
(32/8 heads, D=128, k4v2_g128).

    PYTHONPATH=$PWD python benchmarks/record_copies.py --out $OUT/record_copies.txt

Times are CUDA-graph replays; TB/s counts the record bytes of the batch.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import kvarn_torch  # noqa: F401  (before triton)
import decode_attention as da  # benchmarks/ (imports kvarn_jax before jax)
import jax.numpy as jnp
import numpy as np
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from kvarn_torch import gluon_attention as ga

HALVES = gl.constexpr(6912)  # a record: 13,824 bytes
# 16-byte pieces, 8 halfwords a lane each (a record: 4096 + 2048 + 512 + 256 halfwords).
PIECES = gl.constexpr(gl.BlockedLayout([8], [32], [1], [0]))
ONE_D = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
SEEN = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))


@gluon.jit
def _split_range(lens_ptr, splits):
    n_blocks = gl.cdiv(gl.load(lens_ptr + gl.program_id(0)), 128)
    per = gl.cdiv(n_blocks, splits)
    lo = gl.program_id(2) * per
    return lo, gl.minimum(lo + per, n_blocks)


@gluon.jit
def _store_seen(out_ptr, seen):
    pid = (gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)) * gl.num_programs(2)
    gl.store(out_ptr + pid + gl.program_id(2), gl.sum(seen, 0))


@gluon.jit
def _cp_async_piece(bufs, stage, halves_ptr, rec, START: gl.constexpr, N: gl.constexpr):
    i = gl.arange(0, N, layout=PIECES)
    src = halves_ptr + gl.multiple_of(rec + START, 8)  # records are 16-byte aligned
    async_copy.async_copy_global_to_shared(bufs.index(stage), src + i)


@gluon.jit
def _cp_async_kernel(out_ptr, halves_ptr, bt_ptr, lens_ptr, splits, bt_stride_b):
    lo, hi = _split_range(lens_ptr, splits)
    h = gl.program_id(1)
    hk = gl.num_programs(1)
    # two stages of a record, 27 KB as the kernel's were
    k_bufs = gl.allocate_shared_memory(gl.int16, [2, 4096], ONE_D)
    v_bufs = gl.allocate_shared_memory(gl.int16, [2, 2048], ONE_D)
    c_bufs = gl.allocate_shared_memory(gl.int16, [2, 512], ONE_D)
    d_bufs = gl.allocate_shared_memory(gl.int16, [2, 256], ONE_D)
    bt_row = bt_ptr + gl.program_id(0).to(gl.int64) * bt_stride_b
    seen = gl.zeros([32], gl.int32, SEEN)
    for i in range(lo, hi):
        rec = (gl.load(bt_row + i).to(gl.int64) * hk + h) * HALVES
        stage = (i - lo) % 2
        _cp_async_piece(k_bufs, stage, halves_ptr, rec, 0, 4096)
        _cp_async_piece(v_bufs, stage, halves_ptr, rec, 4096, 2048)
        _cp_async_piece(c_bufs, stage, halves_ptr, rec, 6144, 512)
        _cp_async_piece(d_bufs, stage, halves_ptr, rec, 6656, 256)
        async_copy.commit_group()
        async_copy.wait_group(1)  # the record before this one
        gl.thread_barrier()
        seen += v_bufs.index(1 - stage).slice(0, 32).load(SEEN).to(gl.int32)
        gl.thread_barrier()
    async_copy.wait_group(0)
    _store_seen(out_ptr, seen)


@gluon.jit
def _tma_kernel(out_ptr, k_desc, v_desc, coef_desc, line_desc, bt_ptr, lens_ptr, splits,
                bt_stride_b):
    lo, hi = _split_range(lens_ptr, splits)
    h = gl.program_id(1)
    hk = gl.num_programs(1)
    ks, vs, cs, ds, bars = ga._stage_buffers()
    bt_row = bt_ptr + gl.program_id(0).to(gl.int64) * bt_stride_b
    seen = gl.zeros([32], gl.int32, SEEN)
    if lo < hi:
        ga._copy_record(k_desc, v_desc, coef_desc, line_desc, ks, vs, cs, ds, bars.index(0),
                        0, gl.load(bt_row + lo) * hk + h)
    for i in range(lo, hi):
        stage = (i - lo) % ga.STAGES
        if i + 1 < hi:
            nxt = 1 - stage
            ga._copy_record(k_desc, v_desc, coef_desc, line_desc, ks, vs, cs, ds,
                            bars.index(nxt), nxt, gl.load(bt_row + i + 1) * hk + h)
        mbarrier.wait(bars.index(stage), ((i - lo) // ga.STAGES) & 1)
        seen += vs.index(stage)._reinterpret(gl.int16, [2048], ONE_D).slice(0, 32).load(
            SEEN).to(gl.int32)
        gl.thread_barrier()
    _store_seen(out_ptr, seen)


def measure(b: int, ctx: int, rng) -> str:
    cache, table, lens, _ = da.build_jax_cache(b, ctx, 8, 128, jnp.float16, rng)
    tc = da.torch_view(cache)
    tt, tl = torch.from_dlpack(table), torch.from_dlpack(lens)
    hk, nb = tc.num_kv_heads, tt.shape[1]
    gbytes = b * hk * nb * tc.pages.shape[2]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ga.num_splits(b * hk, 0, nb, sms)  # no pool launch beside: all 8 programs per SM
    out = torch.zeros(b * hk * splits, dtype=torch.int32, device="cuda")
    grid = (b, hk, splits)
    runs = {
        "cp.async": lambda: _cp_async_kernel[grid](out, tc.pages.view(torch.int16), tt, tl,
                                                   splits, tt.stride(0), num_warps=1),
        "TMA": lambda: _tma_kernel[grid](out, *ga.descriptors(tc.pages), tt, tl, splits,
                                         tt.stride(0), num_warps=1),
    }
    row = [f"{b:3d} x {ctx:6d} ({gbytes / 1e6:5.0f} MB, {splits} splits)"]
    for name, fn in runs.items():
        us = da.time_graph(fn)
        row.append(f"{name} {us:7.1f} us {gbytes / us / 1e6:5.2f} TB/s")
    return " | ".join(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+",
                    default=["16x32768", "64x4096", "8x32768", "64x32768"])
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--commit", help="commit measured (default: git's HEAD)")
    args = ap.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip()
    lines = [f"{torch.cuda.get_device_name()}, {datetime.date.today()}, commit {commit}",
             "command: python benchmarks/record_copies.py " + " ".join(sys.argv[1:])]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        b, ctx = map(int, shape.split("x"))
        lines.append(measure(b, ctx, rng))
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
