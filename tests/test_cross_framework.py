"""Every implementation gives the oracle's bytes: rotate, quantize and (references) dequantize.

The references run on REFERENCE_TILES random tiles per case, the kernels (interpreted on
the CPU, compiled on a GPU) on the first KERNEL_TILES of them; all on the adversarial set.
`kvarn check --tiles 20000` runs the large GPU sweep with the same machinery.
"""

import functools

import numpy as np
import pytest

from kvarn import check, oracle
from kvarn.format import layout

REFERENCE_TILES = 2000
KERNEL_TILES = 200
SEED = 2026

IMPLEMENTATIONS, MISSING = check.load_implementations()
CASES = check.all_cases()


def _first_difference(got, want, lay):
    tile, byte = (int(i[0]) for i in np.nonzero(got != want))
    name = next(n for n, f in lay.fields.items() if f.offset <= byte < f.offset + f.nbytes)
    return f"first at tile {tile}, byte {byte} (field {name}): {got[tile, byte]} != {want[tile, byte]}"


def _rows(n: int, total: int) -> np.ndarray:
    return np.r_[0:n, REFERENCE_TILES:total]  # n random tiles + the adversarial set


def _compare(impl, case, k, k_rot, v_rot, records, oracle_dequantized) -> list[str]:
    """What `impl` gets wrong on this case (nothing when every byte matches)."""
    lay = layout(case.preset, case.head_dim)
    n = REFERENCE_TILES if "reference" in impl.name else KERNEL_TILES
    rows = _rows(n, len(k_rot))
    errors = []
    if check.mismatched_bytes(impl.rotate(k[:n]), k_rot[:n]):
        errors.append("rotate differs")
    got = impl.quantize(k_rot[rows], v_rot[rows], case.preset, case.iters)
    if got.shape != records[rows].shape or got.dtype != np.uint8:
        errors.append(f"quantize returned {got.dtype} {got.shape}")
    elif not np.array_equal(got, records[rows]):
        errors.append(f"quantize: {np.count_nonzero(got != records[rows])} bytes differ, "
                      + _first_difference(got, records[rows], lay))
    if impl.dequantize:  # the references; the kernels have no dequantize of their own
        k_deq, v_deq = oracle_dequantized(n)
        got_k, got_v = impl.dequantize(records[rows], case.preset, case.head_dim)
        if check.mismatched_bytes(got_k, k_deq) or check.mismatched_bytes(got_v, v_deq):
            errors.append("dequantize differs")
    return errors


def test_all_frameworks_load():
    assert not MISSING, MISSING
    assert len(IMPLEMENTATIONS) == 4


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.preset}-{c.dtype}-D{c.head_dim}")
def test_bytes_match_oracle(case):
    k, k_rot, v_rot, records = check.build_case(case, REFERENCE_TILES, SEED)

    @functools.cache  # both references dequantize the same rows
    def oracle_dequantized(n):
        return oracle.dequantize(records[_rows(n, len(records))], case.preset, case.head_dim)

    failures = {impl.name: _compare(impl, case, k, k_rot, v_rot, records, oracle_dequantized)
                for impl in IMPLEMENTATIONS}
    failures = {name: errs for name, errs in failures.items() if errs}
    assert not failures, failures


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("iters", [0, 1, 16])
def test_iteration_counts(impl, iters):
    case = check.Case("kvarn_k4v4_g64", "bfloat16", 64, iters)
    _, k_rot, v_rot, want = check.build_case(case, 4, SEED)  # + the adversarial set
    assert check.mismatched_bytes(impl.quantize(k_rot, v_rot, case.preset, iters), want) == 0


def test_parallel_build_gives_the_oracle_records():
    """`kvarn check --workers N` draws and encodes chunks of tiles in worker processes."""
    case = check.Case("kvarn_k4v2_g64", "float16", 64)
    n = 2 * check.ORACLE_CHUNK_TILES + 1  # three chunks, the last one short
    with check.oracle_pool(2) as pool:
        k, k_rot, v_rot, records = check.build_case(case, n, SEED, pool)
    assert len(k) == n and len(k_rot) > n  # the adversarial set follows the random tiles
    assert np.array_equal(k_rot[:n], oracle.rotate(k))
    assert np.array_equal(records, oracle.quantize(k_rot, v_rot, case.preset, case.iters))
