"""`kvarn check`: every available implementation against the NumPy oracle, byte for byte.

Implementations load lazily, so this module (like all of `kvarn`) imports neither jax
nor torch until asked. On a CUDA machine the Pallas and Triton entries are the compiled
kernels; on the CPU they run interpreted, and the references run on the CPU everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np

from kvarn import oracle
from kvarn.format import HEAD_DIMS, PRESETS
from kvarn.tiles import DTYPES, adversarial_tiles, random_tiles

Array = np.ndarray
ORACLE_CHUNK_TILES = 128  # random tiles per worker task of a large check
# The references run on the CPU, where a few dozen tiles per call keep their temporaries in
# cache: 2,000 head_dim-256 tiles quantize 5x faster in calls of 32 (torch) or 128 (jax,
# fewer shapes to compile) than in one call.
TORCH_REFERENCE_TILES = 32
JAX_REFERENCE_TILES = 128


def in_chunks(fn: Callable, tiles: int) -> Callable:
    """`fn` over its leading (tile) axis in calls of at most `tiles` tiles, outputs joined."""
    def run(x, *rest):
        if len(x) <= tiles:
            return fn(x, *rest)
        parts = [fn(x[i: i + tiles], *(r[i: i + tiles] if isinstance(r, np.ndarray) else r
                                      for r in rest)) for i in range(0, len(x), tiles)]
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(p) for p in zip(*parts))
        return np.concatenate(parts)
    return run


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    rotate: Callable[[Array], Array]
    quantize: Callable[[Array, Array, str, int], Array]
    # None for the kernels: they have no dequantize of their own (the attention kernels
    # dequantize in registers and are checked against the references by their tests).
    dequantize: Callable[[Array, str, int], tuple[Array, Array]] | None


def _jax_implementations() -> Iterator[Implementation]:
    import kvarn_jax  # noqa: F401  (sets the exact-CPU XLA flag before jax loads)
    import jax
    import jax.numpy as jnp

    from kvarn_jax import pallas_quantize, pallas_rotate, reference

    cpu = jax.devices("cpu")[0]

    def on_cpu(fn):
        def run(*args):
            with jax.default_device(cpu):
                arrays = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
                return jax.tree.map(np.asarray, fn(*arrays))
        return run

    def on_default(fn):
        def run(*args):
            arrays = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
            return jax.tree.map(np.asarray, fn(*arrays))
        return run

    def ref(fn):
        return in_chunks(on_cpu(fn), JAX_REFERENCE_TILES)

    yield Implementation("jax-reference", ref(reference.rotate), ref(reference.quantize),
                         ref(reference.dequantize))
    kind = "interpret" if jax.default_backend() == "cpu" else jax.default_backend()
    yield Implementation(f"jax-pallas[{kind}]", on_default(pallas_rotate.rotate),
                         on_default(pallas_quantize.quantize), None)


def _to_torch(x: Array, device):
    import torch

    if x.dtype == DTYPES["bfloat16"]:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _from_torch(t) -> Array:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(DTYPES["bfloat16"])
    return t.numpy()


def _torch_implementations() -> Iterator[Implementation]:
    import torch

    import kvarn_torch  # noqa: F401  (selects the Triton interpreter without CUDA)
    from kvarn_torch import codec

    gpu = torch.cuda.is_available()

    def wrap(fn, impl, device):
        def run(*args):
            args = [_to_torch(a, device) if isinstance(a, np.ndarray) else a for a in args]
            out = fn(*args, impl=impl)
            return tuple(map(_from_torch, out)) if isinstance(out, tuple) else _from_torch(out)
        return run

    def ref(fn):
        return in_chunks(wrap(fn, "reference", "cpu"), TORCH_REFERENCE_TILES)

    yield Implementation("torch-reference", ref(codec.rotate), ref(codec.quantize),
                         ref(codec.dequantize))
    device = "cuda" if gpu else "cpu"
    yield Implementation(f"torch-triton[{'cuda' if gpu else 'interpret'}]",
                         wrap(codec.rotate, "triton", device),
                         wrap(codec.quantize, "triton", device), None)


LOADERS = {"jax": _jax_implementations, "torch": _torch_implementations}


def load_implementations(frameworks=("jax", "torch")) -> tuple[list[Implementation], list[str]]:
    """Implementations that load here, and a note for each framework that did not."""
    impls, missing = [], []
    for fw in frameworks:
        try:
            impls.extend(LOADERS[fw]())
        except ImportError as e:
            missing.append(f"{fw}: {e}")
    return impls, missing


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    dtype: str
    head_dim: int
    iters: int = oracle.DEFAULT_ITERS


def _random_part(args) -> tuple[Array, Array, Array, Array]:
    """Raw random K tiles, rotated K and V tiles and the oracle's records for them."""
    case, n, seed = args
    g = PRESETS[case.preset].tile
    rng = np.random.default_rng([*seed, g, case.head_dim, len(case.dtype)])
    k = random_tiles(rng, n, g, case.head_dim, case.dtype)
    k_rot = oracle.rotate(k)
    v_rot = oracle.rotate(random_tiles(rng, n, g, case.head_dim, case.dtype))
    return k, k_rot, v_rot, oracle.quantize(k_rot, v_rot, case.preset, case.iters)


def build_case(case: Case, n_random: int, seed: int, pool: Executor | None = None):
    """(raw K, rotated K, rotated V, oracle records) of `n_random` random tiles followed
    by the adversarial set, used as is (any fp16/bf16 tile is a valid rotated tile).
    With a process pool, chunks of random tiles are drawn and encoded in parallel."""
    if pool is None:
        parts = [_random_part((case, n_random, [seed]))]
    else:
        # small chunks keep every worker busy to the end (16 chunks on 15 workers took
        # two rounds)
        chunks = max(1, -(-n_random // ORACLE_CHUNK_TILES))
        sizes = [len(c) for c in np.array_split(np.arange(n_random), chunks)]
        parts = list(pool.map(_random_part, [(case, n, [seed, i]) for i, n in enumerate(sizes)]))
    g = PRESETS[case.preset].tile
    adv = np.stack(list(adversarial_tiles(g, case.head_dim, case.dtype).values()))
    adv_records = oracle.quantize(adv, adv[::-1], case.preset, case.iters)
    k = np.concatenate([p[0] for p in parts])
    k_rot = np.concatenate([p[1] for p in parts] + [adv])
    v_rot = np.concatenate([p[2] for p in parts] + [adv[::-1]])
    records = np.concatenate([p[3] for p in parts] + [adv_records])
    return k, k_rot, v_rot, records


def oracle_pool(workers: int) -> Executor | None:
    """Worker processes for large checks; spawned, since jax and torch may hold threads."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def mismatched_bytes(a: Array, b: Array) -> int:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.nbytes, b.nbytes)
    return int(np.count_nonzero(a.view(np.uint8) != b.view(np.uint8)))


def check_case(case: Case, impls: list[Implementation], n_random: int, seed: int,
               pool: Executor | None = None) -> tuple[int, dict[str, int]]:
    """(tile pairs, mismatched bytes per implementation) for one case."""
    k, k_rot, v_rot, records = build_case(case, n_random, seed, pool)
    if any(impl.dequantize for impl in impls):
        k_deq, v_deq = oracle.dequantize(records, case.preset, case.head_dim)
    result = {}
    for impl in impls:
        bad = mismatched_bytes(impl.rotate(k), k_rot[:n_random])
        bad += mismatched_bytes(impl.quantize(k_rot, v_rot, case.preset, case.iters), records)
        if impl.dequantize:
            got_k, got_v = impl.dequantize(records, case.preset, case.head_dim)
            bad += mismatched_bytes(got_k, k_deq) + mismatched_bytes(got_v, v_deq)
        result[impl.name] = bad
    return len(k_rot), result


def all_cases(presets=tuple(PRESETS), dtypes=tuple(DTYPES), head_dims=HEAD_DIMS,
              iters=oracle.DEFAULT_ITERS) -> list[Case]:
    return [Case(p, t, d, iters) for p in presets for t in dtypes for d in head_dims]

