"""KVarN KV-cache quantization: presets, record layout and the NumPy oracle.

Framework-free: importing `kvarn` never imports jax or torch. The JAX/Pallas codec lives
in `kvarn_jax`, the torch/Triton mirror in `kvarn_torch`.
"""

from kvarn.format import DEFAULT_PRESET, HEAD_DIMS, PRESETS, Layout, Preset, get_preset, layout

__version__ = "0.1.0"
__all__ = ["DEFAULT_PRESET", "HEAD_DIMS", "PRESETS", "Layout", "Preset", "get_preset", "layout"]
