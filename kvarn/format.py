"""KVarN presets and the byte layout of one tile record.

A record holds one tile (G tokens of one KV head, one paged-cache block) of K and V,
in upstream's field order::

    K codes | a_K | z_K | tau_K | V codes | sigma_V | a_V | z_V | zero pad to 16 bytes

K codes are channel-major (D rows of G codes, packed along tokens); V codes are
token-major (G rows of D codes, packed along channels). Every scale field is fp16,
little-endian. This module is framework-free: it only does arithmetic on sizes.
"""

from __future__ import annotations

import dataclasses
import functools

HEAD_DIMS = (64, 128, 256)
RECORD_ALIGN = 16
FP16_BYTES = 2


@dataclasses.dataclass(frozen=True)
class Preset:
    """A KVarN cache format: key bits, value bits and tile size (tokens per block)."""

    name: str
    k_bits: int
    v_bits: int
    tile: int

    @property
    def k_qmax(self) -> int:
        return (1 << self.k_bits) - 1

    @property
    def v_qmax(self) -> int:
        return (1 << self.v_bits) - 1


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("kvarn_k4v2_g128", 4, 2, 128),
        Preset("kvarn_k4v4_g128", 4, 4, 128),
        Preset("kvarn_k4v2_g64", 4, 2, 64),
        Preset("kvarn_k4v4_g64", 4, 4, 64),
        Preset("kvarn_k2v2_g128", 2, 2, 128),
        Preset("kvarn_k2v2_g64", 2, 2, 64),
    )
}
DEFAULT_PRESET = "kvarn_k4v2_g128"


@dataclasses.dataclass(frozen=True)
class Field:
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of every field of one record for a preset and head_dim."""

    preset: Preset
    head_dim: int
    k_codes: Field
    a_k: Field
    z_k: Field
    tau_k: Field
    v_codes: Field
    sigma_v: Field
    a_v: Field
    z_v: Field
    raw_bytes: int
    record_bytes: int

    @property
    def fields(self) -> dict[str, Field]:
        names = ("k_codes", "a_k", "z_k", "tau_k", "v_codes", "sigma_v", "a_v", "z_v")
        return {n: getattr(self, n) for n in names}

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token per KV head, K and V together, padding included."""
        return self.record_bytes / self.preset.tile

    @property
    def capacity_vs_fp16(self) -> float:
        """How many more tokens fit than in an fp16 cache of the same size."""
        return 4 * self.head_dim / self.bytes_per_token


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown KVarN preset {name!r}; supported presets: {', '.join(PRESETS)}"
        ) from None


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} is not supported by KVarN; supported head dims: "
            f"{', '.join(map(str, HEAD_DIMS))}"
        )


@functools.cache
def layout(preset: str | Preset, head_dim: int) -> Layout:
    """The record layout of `preset` at `head_dim` (raises ValueError if unsupported)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    check_head_dim(head_dim)
    d, g = head_dim, p.tile
    sizes = [
        ("k_codes", d * g * p.k_bits // 8),
        ("a_k", d * FP16_BYTES),
        ("z_k", d * FP16_BYTES),
        ("tau_k", g * FP16_BYTES),
        ("v_codes", g * d * p.v_bits // 8),
        ("sigma_v", d * FP16_BYTES),
        ("a_v", g * FP16_BYTES),
        ("z_v", g * FP16_BYTES),
    ]
    fields, offset = {}, 0
    for name, nbytes in sizes:
        fields[name] = Field(offset, nbytes)
        offset += nbytes
    record = -(-offset // RECORD_ALIGN) * RECORD_ALIGN
    return Layout(p, d, **fields, raw_bytes=offset, record_bytes=record)
