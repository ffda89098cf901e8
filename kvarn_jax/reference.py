"""The jnp reference of the KVarN codec: the tile math of `tile_math`, vmapped over tiles.

Run it on the CPU with `XLA_FLAGS=--xla_cpu_max_isa=AVX` (set by `kvarn_jax` on import)
for bytes identical to the oracle; the Pallas kernels are the fast path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvarn import oracle
from kvarn.checks import check_iters, check_records, check_rotate_input, check_tiles
from kvarn_jax import tile_math

F32 = jnp.float32


def rotate(x: jax.Array) -> jax.Array:
    """Normalized Hadamard rotation of the last axis (its own inverse); same dtype out."""
    check_rotate_input(x.shape, x.dtype)
    return _rotate(x)


@jax.jit
def _rotate(x):
    rows = x.reshape(-1, x.shape[-1])
    return tile_math.rotate_rows(rows).reshape(x.shape)


def quantize(k_rot: jax.Array, v_rot: jax.Array, preset: str,
             iters: int = oracle.DEFAULT_ITERS) -> jax.Array:
    """Rotated K, V tiles [N, G, D] (fp16/bf16) -> records [N, record_bytes] uint8."""
    lay = check_tiles(k_rot.shape, k_rot.dtype, v_rot.shape, v_rot.dtype, preset)
    check_iters(iters)
    return _quantize(k_rot, v_rot, lay.preset.k_bits, lay.preset.v_bits, iters,
                     lay.record_bytes - lay.raw_bytes)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _quantize(k_rot, v_rot, k_bits, v_bits, iters, pad):
    def one(k, v):
        fields = tile_math.record_fields(k, v, k_bits, v_bits, iters, gpu=False)
        return jnp.concatenate(fields + [jnp.zeros((pad,), jnp.uint8)])

    return jax.vmap(one)(k_rot, v_rot)


def dequantize(records: jax.Array, preset: str, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Records [N, record_bytes] -> K, V [N, G, D] float32 in the rotated frame."""
    lay = check_records(records.shape, records.dtype, preset, head_dim)
    return _dequantize(records, lay)


def _field(records, lay, name):
    f = lay.fields[name]
    raw = records[:, f.offset:f.offset + f.nbytes]
    if name.endswith("codes"):
        return raw
    u16 = raw[:, 0::2].astype(jnp.uint16) | (raw[:, 1::2].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u16, jnp.float16).astype(F32)


def unpack(w: jax.Array, bits: int) -> jax.Array:
    """[..., B] uint8 -> [..., B * 8 // bits] int32 codes, LSB first."""
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(*w.shape[:-1], w.shape[-1] * per).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(records, lay):
    p, d, g, n = lay.preset, lay.head_dim, lay.preset.tile, records.shape[0]
    qk = unpack(_field(records, lay, "k_codes").reshape(n, d, -1), p.k_bits).astype(F32)
    qv = unpack(_field(records, lay, "v_codes").reshape(n, g, -1), p.v_bits).astype(F32)
    a_k, z_k, tau_k, sigma_v, a_v, z_v = (
        _field(records, lay, f) for f in ("a_k", "z_k", "tau_k", "sigma_v", "a_v", "z_v"))
    k = (qk * a_k[:, :, None] + z_k[:, :, None]) * tau_k[:, None, :]
    v = (qv * a_v[:, :, None] + z_v[:, :, None]) * sigma_v[:, None, :]
    return jnp.swapaxes(k, -1, -2), v
