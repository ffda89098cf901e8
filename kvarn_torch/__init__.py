"""KVarN for torch: the torch reference and Triton kernels of the tile codec.

Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
the modules defining them are imported: importing kvarn_torch sets TRITON_INTERPRET=1
then (unless it is already set). The results are the oracle's bytes either way.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvarn_torch.codec import dequantize, quantize, rotate, unrotate  # noqa: E402

__all__ = ["dequantize", "quantize", "rotate", "unrotate"]
