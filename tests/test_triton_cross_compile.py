"""Every Triton and Gluon kernel of kvarn_torch compiles for an H100 (sm_90) on the CPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code that the GPU
compiler rejects (a non-constexpr global read inside a kernel, an op without a lowering).
`benchmarks/compile_report.py --all-kernels` compiles each kernel once per kind of launch
with Triton's own ptxas, no GPU needed; it imports Triton compiled, so it runs in its own
process."""

import os
import subprocess
import sys
from pathlib import Path

KERNELS = ("_attention_kernel", "_merge_kernel", "_gather_kernel", "_rotate_kernel",
           "_write_kernel", "_copy_kernel", "_quantize_kernel", "_record_kernel")


def test_every_kernel_compiles_for_sm90():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_report.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--all-kernels", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = [line.split()[0].removeprefix("kernel=") for line in run.stdout.splitlines()]
    assert set(compiled) == set(KERNELS), run.stdout
    # 6 attention launches, a chunk-invariant one and the Gluon path's 2 pool launches,
    # merge, gather, 3 rotate, 4 write, 2 flush copies, 4 quantize, the Gluon kernel
    assert len(compiled) == 25
