"""KVarN for torch: the torch reference and Triton kernels of the tile codec.

Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
Triton is imported: importing kvarn_torch sets TRITON_INTERPRET=1 then (unless it is
already set), and refuses with a message when Triton was imported first. The results are the oracle's bytes either way.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton's own library functions (tl.sum, ...) were built for a GPU at its import
        # and fail inside interpreted kernels.
        raise ImportError("without a GPU, kvarn_torch runs Triton in its interpreter, which "
                          "must be chosen before Triton is imported: import kvarn_torch "
                          "before triton (and before vllm), or set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvarn_torch.codec import dequantize, quantize, rotate, unrotate  # noqa: E402

__all__ = ["dequantize", "quantize", "rotate", "unrotate"]
