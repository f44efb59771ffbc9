"""The global switch: PyTorch's own transposed convolutions, in unchanged model code,
computed by our kernels.

``enable()`` registers a kernel for ``aten::convolution`` at the autograd and backend
dispatch keys of the devices where our kernels run (CUDA, and the CPU under
``TRITON_INTERPRET=1``), so that calls under ``torch.inference_mode`` come too.
Every transposed convolution that reaches it (``F.conv_transpose1d/2d/3d``,
``nn.ConvTranspose*d`` of any model, a direct ``torch.ops.aten.convolution`` with
``transposed=True``) is computed by ``tritondeconv.conv_transpose{1,2,3}d``, which
records its own gradients; everything else (ordinary convolutions, unsupported dtypes,
devices where the kernels do not run, any convolution our own code calls while it
runs, and every convolution inside a ``torch.func`` transform: reached here, below the
transform's own layer, our transform-aware Functions cannot run) goes to
``aten::_convolution``, the op aten's ``convolution`` calls itself, with the flags it
would pass: exactly aten's result and gradients, never a re-entry into the switch.
``disable()`` removes the registration, restoring aten's dispatch exactly.

How it differs from the other ways in:

* ``tritondeconv.conv_transpose2d(...)``: one call, explicitly;
* ``tritondeconv.convert(model)``: one model's modules swapped for ours (they keep a
  packed weight between calls, and ``torch.compile`` sees our ops);
* ``enable()``: every transposed convolution in the process, no code changed; eager
  mode only (``torch.compile`` lowers ``aten::convolution`` itself, so a compiled
  graph keeps inductor's convolution).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from . import functional
from .backends import allow_tf32, runs_triton
from .kernels.common import INTERPRETING

_FUNCTIONS = {1: functional.conv_transpose1d, 2: functional.conv_transpose2d, 3: functional.conv_transpose3d}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOCK = threading.Lock()
_STATE = threading.local()  # .inside: this thread is computing a convolution for the switch
_LIBRARY: list[torch.library.Library] = []


def _aten(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """What ``aten::convolution`` computes: ``aten::_convolution`` with the flags of
    PyTorch's settings."""
    return torch.ops.aten._convolution.default(
        input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.enabled, allow_tf32())


def _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """The switch's ``aten::convolution``: ours for a transposed convolution we compute,
    aten's otherwise."""
    ours = (transposed and not getattr(_STATE, "inside", False) and 3 <= input.dim() <= 5
            and input.dim() == weight.dim() and input.dtype in _DTYPES and runs_triton(input.device)
            and torch._C._functorch.peek_interpreter_stack() is None)
    if not ours:
        return _aten(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    _STATE.inside = True
    try:
        return _FUNCTIONS[input.dim() - 2](input, weight, bias, stride, padding, output_padding, groups, dilation)
    finally:
        _STATE.inside = False


def _keys() -> tuple[str, ...]:
    """The dispatch keys the switch takes ``aten::convolution`` at: each device's autograd
    key (where it records its own gradients) and its backend key (what a call reaches
    where autograd is skipped: under ``torch.inference_mode``, or on inference tensors)."""
    devices = ("CUDA", "CPU") if INTERPRETING else ("CUDA",)
    return tuple(key for device in devices for key in (f"Autograd{device}", device))


def enable() -> None:
    """Route PyTorch's transposed convolutions to our kernels (see the module docstring);
    idempotent."""
    with _LOCK:
        if _LIBRARY:
            return
        library = torch.library.Library("aten", "IMPL")
        for key in _keys():
            library.impl("convolution", _convolution, key)
        _LIBRARY.append(library)


def disable() -> None:
    """Restore aten's own transposed convolutions; idempotent."""
    with _LOCK:
        while _LIBRARY:
            _LIBRARY.pop()._destroy()


def is_enabled() -> bool:
    """Whether ``enable()`` is in force."""
    return bool(_LIBRARY)


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``enable()`` for the block, then the state before it."""
    before = is_enabled()
    enable()
    try:
        yield
    finally:
        if not before:
            disable()
