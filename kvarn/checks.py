"""Input checks shared by every implementation, with errors that say what to change."""

from __future__ import annotations

from collections.abc import Sequence

from kvarn.format import Layout, layout

TILE_DTYPES = ("float16", "bfloat16")
ROTATE_DTYPES = ("float16", "bfloat16", "float32")
MAX_ITERS = 64


def _dtype_name(dtype) -> str:
    """'float16' for np.float16, jnp.float16, torch.float16 or the string itself."""
    name = getattr(dtype, "name", None) or str(dtype)
    return name.removeprefix("torch.")


def check_rotate_input(shape: Sequence[int], dtype) -> None:
    name = _dtype_name(dtype)
    if name not in ROTATE_DTYPES:
        raise TypeError(f"rotate takes {', '.join(ROTATE_DTYPES)}; got {name}: cast first")
    if not shape or shape[-1] not in (64, 128, 256):
        raise ValueError(
            f"rotate acts on the last axis, which must be a head_dim of 64, 128 or 256; "
            f"got shape {tuple(shape)}"
        )


def check_iters(iters: int) -> None:
    if not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
        raise ValueError(f"iters must be an int in [0, {MAX_ITERS}] (default 8); got {iters!r}")


def check_tiles(k_shape, k_dtype, v_shape, v_dtype, preset: str) -> Layout:
    """Validate K and V tile batches for `quantize`; return the record layout."""
    for what, dtype in (("k", k_dtype), ("v", v_dtype)):
        name = _dtype_name(dtype)
        if name not in TILE_DTYPES:
            raise TypeError(
                f"{what} tiles must be float16 or bfloat16 (the model dtype); got {name}"
            )
    if _dtype_name(k_dtype) != _dtype_name(v_dtype):
        raise TypeError(f"k and v dtypes differ: {_dtype_name(k_dtype)} vs {_dtype_name(v_dtype)}")
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v shapes differ: {tuple(k_shape)} vs {tuple(v_shape)}")
    if len(k_shape) != 3:
        raise ValueError(
            f"tiles must have shape [N, tile, head_dim]; got {len(k_shape)} dims {tuple(k_shape)}"
        )
    _, g, d = k_shape
    lay = layout(preset, d)
    if g != lay.preset.tile:
        raise ValueError(
            f"preset {lay.preset.name} quantizes tiles of {lay.preset.tile} tokens; got tiles "
            f"of {g} tokens (shape {tuple(k_shape)})"
        )
    return lay


def check_records(shape: Sequence[int], dtype, preset: str, head_dim: int) -> Layout:
    """Validate a record batch for `dequantize`; return the record layout."""
    lay = layout(preset, head_dim)
    if _dtype_name(dtype) != "uint8":
        raise TypeError(f"records must be uint8; got {_dtype_name(dtype)}")
    if len(shape) != 2 or shape[1] != lay.record_bytes:
        raise ValueError(
            f"records of {lay.preset.name} at head_dim {head_dim} have shape "
            f"[N, {lay.record_bytes}]; got {tuple(shape)}"
        )
    return lay
