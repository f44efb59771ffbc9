"""Which implementation computes a call: where the Triton kernels run, the backend that
chooses between them and aten's convolution, and the precision aten's convolution
would use (which the kernels follow).

* CUDA tensors: always the Triton kernels.
* CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels, run by the Triton
  interpreter (this is how CI tests the kernels).
* CPU tensors otherwise: aten's convolutions (Triton has no CPU backend).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

import torch

from .kernels import launcher
from .kernels.common import INTERPRETING
from .kernels.tuning import NoConfigurationRan

BACKENDS = ("triton", "auto")


def runs_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels (see the module docstring;
    also any device while the kernels' launches are replaced or stubbed:
    ``kernels.launcher.intercept``, ``kernels.launcher.stub_launches``)."""
    kind = device.type
    return kind == "cuda" or (INTERPRETING and kind == "cpu") or launcher.launches_replaced()


def _backend_from_environment() -> str:
    name = os.environ.get("TRITONDECONV_BACKEND", "triton") or "triton"
    if name not in BACKENDS:
        warnings.warn(f"tritondeconv: TRITONDECONV_BACKEND must be one of {', '.join(BACKENDS)}, but is {name!r}; "
                      "using 'triton'", stacklevel=2)
        return "triton"
    return name


# The backend in force: ``TRITONDECONV_BACKEND``, read when the package is imported, until
# ``set_backend`` changes it.  Part of every prepared call's class.
BACKEND = [_backend_from_environment()]


def set_backend(backend: str) -> None:
    """Which implementation the ops run where the kernels run:

    * ``"triton"`` (default): always our Triton kernels (bitwise-reproducible, the
      output's strides exactly aten's);
    * ``"auto"``: on each op's first call for a shape, our kernels race aten's own
      convolution (cuDNN on a GPU), forward and each gradient apart, and the faster is
      remembered for that shape (in this process and in the tuning cache).

    ``TRITONDECONV_BACKEND`` sets the starting value."""
    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {', '.join(BACKENDS)}, but got {backend!r}")
    BACKEND[0] = backend


def get_backend() -> str:
    """The backend ``set_backend`` set (see there)."""
    return BACKEND[0]


def allow_tf32(dtype: torch.dtype = torch.float32) -> bool:
    """Whether products of ``dtype`` tensors may round to TF32: never but for float32,
    and for float32 as aten's convolution decides it:
    the precision set for cuDNN convolutions (``torch.backends.cudnn.conv.fp32_precision``),
    where that is "none" the one set for cuDNN as a whole, then the global one
    (``torch.backends.fp32_precision``); TF32 only where the first that is set says
    "tf32".  The legacy ``torch.backends.cudnn.allow_tf32`` writes the convolution's
    setting, so it is honoured too; its getter is never called (it raises once the two
    APIs have been mixed)."""
    if dtype != torch.float32:
        return False
    for backend, operation in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
        precision = torch._C._get_fp32_precision_getter(backend, operation)
        if precision != "none":
            return precision == "tf32"
    return False


def computed(op: str, device: torch.device, kernels: Callable[[], torch.Tensor], aten: Callable[[], torch.Tensor],
             call: tuple) -> tuple[bool, torch.Tensor]:
    """``(ours, result)``: ``kernels()`` where the Triton kernels run (``ours`` True),
    ``aten()`` elsewhere, and ``aten()`` with a warning where no configuration of a kernel
    could run for the shape (a first call never fails for the tuner's sake).  Under the
    ``"auto"`` backend, whichever of the two won the race for ``op`` on the class of
    calls ``call`` (a tuple of values that JSON can write, tensors' layouts, dtypes and
    devices among them)."""
    if not runs_triton(device):
        return False, aten()
    try:
        if BACKEND[0] == "auto":
            runs = {"tritondeconv": kernels, "aten": aten}
            winner = launcher.race(device, (op, json.dumps(call, default=str)), runs)
            return winner == "tritondeconv", runs[winner]()
        return True, kernels()
    except NoConfigurationRan as error:
        warnings.warn(f"{error}; computed by aten's convolution instead", stacklevel=2)
        return False, aten()
