"""What every kernel launcher shares: the run mode and the dot-operand choices."""
import os
import threading

import torch
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("TRITONDECONV_AUTOTUNE", "1") != "0"

# Launches are serialised: a first call of a shape times every candidate configuration
# (``tuning.Tuner``), and a second thread launching meanwhile would both skew those
# timings and race on the tuner's memo.  Each launch is a few microseconds of host work
# (the GPU still runs them asynchronously).
LAUNCH_LOCK = threading.Lock()

_OPERAND_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def operand_dtype(dtype: torch.dtype):
    """The dtype tiles are fed to ``tl.dot`` in: the tensors' own, except that the
    interpreter multiplies bf16 as fp32 (numpy has no bf16; products of bf16 values are
    exact in fp32, so the result is the same)."""
    if INTERPRETING and dtype == torch.bfloat16:
        return tl.float32
    return _OPERAND_DTYPES[dtype]


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 when PyTorch's conv would use it."""
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


def needs_int64(*tensors) -> bool:
    """Whether some element of these tensors lies 2**31 or more elements from its base, so
    that the kernels must index in 64 bits (otherwise they keep 32-bit index arithmetic)."""
    return any(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 - 1
               for t in tensors if t is not None and t.numel() > 0)
