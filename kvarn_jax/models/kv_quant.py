"""KV-cache quantizers as tile quantize-dequantize functions, for accuracy comparisons.

Every method maps one committed tile per (tile, KV head) to what attention would read back:
K, V [N, G, Hk, D] in the cache dtype (fp16) -> float32 [N, G, Hk, D], original frame.

* `kvarn`: the real codec (`kvarn_jax.codec`: rotate, quantize to the record bytes,
  dequantize) then the inverse rotation in fp32; attention over these values equals
  attention over the cache in the rotated frame up to fp32 rounding.
* baselines, emulated on the same tiles with fp16 scales and zeros as real kernels store:
  `int4-token` (asymmetric RTN per token, vLLM/SGLang int4 style), `kivi2` (KIVI: K 2-bit
  per channel in groups of `group` tokens, V 2-bit per token in groups of `group`
  channels), `fp8` (e4m3 cast with scale 1, vLLM's default without calibrated scales;
  saturating), `hadamard-q4_0` (Hadamard over head_dim, then llama.cpp's q4_0: symmetric
  int4 in blocks of 32 channels with one fp16 scale).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvarn.format import layout
from kvarn_jax import codec, reference

F32 = jnp.float32
Fn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Method:
    """name; tile: tokens per committed tile (the decode schedule's chunk); fn: the
    quantize-dequantize; bits: storage bits per K/V element, scales included."""

    name: str
    tile: int
    fn: Fn = dataclasses.field(compare=False)
    bits: float


def _f16(x: jax.Array) -> jax.Array:
    """Round to fp16 and back: scales and zeros are stored as fp16."""
    return x.astype(jnp.float16).astype(F32)


def rtn(x: jax.Array, bits: int, axis: int) -> jax.Array:
    """Asymmetric min/max round-to-nearest along `axis` with fp16 scale and zero."""
    qmax = (1 << bits) - 1
    x = x.astype(F32)
    lo = _f16(jnp.min(x, axis=axis, keepdims=True))
    hi = jnp.max(x, axis=axis, keepdims=True)
    # A scale that rounds to 0 in fp16 would divide by zero: floor at fp16's smallest normal.
    delta = jnp.maximum(_f16((hi - lo) / qmax), 2.0 ** -14)
    q = jnp.clip(jnp.round((x - lo) / delta), 0, qmax)
    return q * delta + lo


def _grouped(x: jax.Array, axis: int, group: int, fn: Callable[[jax.Array, int], jax.Array]):
    """Apply fn(x, axis) on groups of `group` along `axis` (split in place)."""
    n = x.shape[axis]
    if n % group:
        raise ValueError(f"group {group} does not divide axis of length {n}")
    shape = x.shape[:axis] + (n // group, group) + x.shape[axis + 1:]
    return fn(x.reshape(shape), axis + 1).reshape(x.shape)


def _tiles_first(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """[N, G, Hk, D] -> [N * Hk, G, D] (the codec's tile layout)."""
    n, g, hk, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(n * hk, g, d), x.shape


def _tiles_back(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n, g, hk, d = shape
    return jnp.swapaxes(x.reshape(n, hk, g, d), 1, 2)


def kvarn(preset: str, head_dim: int, iters: int = 8, impl: str = "auto") -> Method:
    lay = layout(preset, head_dim)

    def fn(k, v):
        kt, shape = _tiles_first(k)
        vt, _ = _tiles_first(v)
        recs = codec.quantize(codec.rotate(kt, impl=impl), codec.rotate(vt, impl=impl),
                              preset, iters, impl=impl)
        kd, vd = codec.dequantize(recs, preset, head_dim)  # fp32, rotated frame
        return (_tiles_back(reference.rotate(kd), shape),
                _tiles_back(reference.rotate(vd), shape))

    suffix = "" if iters == 8 else f"-it{iters}"
    name = preset.removeprefix("kvarn_").replace("_", "-")
    return Method(f"kvarn-{name}{suffix}", lay.preset.tile, fn,
                  8 * lay.bytes_per_token / (2 * head_dim))


def int4_per_token(head_dim: int, tile: int = 128) -> Method:
    def fn(k, v):
        return rtn(k, 4, axis=-1), rtn(v, 4, axis=-1)
    return Method("int4-token", tile, fn, 4.0 + 32 / head_dim)  # fp16 scale + zero per token


def kivi2(k_group: int = 32, v_group: int = 32, tile: int = 128) -> Method:
    """KIVI-2: K per channel over groups of `k_group` tokens, V per token over groups of
    `v_group` channels (KIVI's default: 32 and 32)."""
    def fn(k, v):
        k_hat = _grouped(k, 1, k_group, lambda x, ax: rtn(x, 2, ax))
        v_hat = _grouped(v, 3, v_group, lambda x, ax: rtn(x, 2, ax))
        return k_hat, v_hat
    bits = 2.0 + (16 / k_group + 16 / v_group)  # fp16 scale + zero per group, K and V averaged
    return Method(f"kivi2-k{k_group}v{v_group}", tile, fn, bits)


def fp8_e4m3(tile: int = 128) -> Method:
    def fn(k, v):
        def cast(x):  # e4m3fn has no infinity: saturate at its largest finite value
            x = jnp.clip(x.astype(F32), -448.0, 448.0)
            return x.astype(jnp.float8_e4m3fn).astype(F32)
        return cast(k), cast(v)
    return Method("fp8-e4m3", tile, fn, 8.0)


def q4_0(x: jax.Array, axis: int) -> jax.Array:
    """llama.cpp's q4_0 on blocks along `axis`: d = (signed value of largest |x|) / -8,
    q = clamp(floor(x / d + 8.5), 0, 15), x_hat = (q - 8) * fp16(d)."""
    x = x.astype(F32)
    idx = jnp.argmax(jnp.abs(x), axis=axis, keepdims=True)
    d = jnp.take_along_axis(x, idx, axis=axis) / -8.0
    inv = jnp.where(d != 0, 1.0 / jnp.where(d != 0, d, 1.0), 0.0)
    q = jnp.clip(jnp.floor(x * inv + 8.5), 0, 15)
    return (q - 8.0) * _f16(d)


def hadamard_q4_0(tile: int = 128, block: int = 32) -> Method:
    def fn(k, v):
        def one(x):
            xr = reference.rotate(x.astype(F32))
            return reference.rotate(_grouped(xr, 3, block, q4_0))
        return one(k), one(v)
    return Method("hadamard-q4_0", tile, fn, 4.0 + 16 / block)


def baselines(head_dim: int) -> list[Method]:
    """The comparison set; int4-token's and KIVI's scale overhead depends on head_dim."""
    return [int4_per_token(head_dim), kivi2(32, 32), kivi2(128, head_dim), fp8_e4m3(), hadamard_q4_0()]
