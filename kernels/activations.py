"""The activations the kernel's epilogue can apply, each in one place: how the kernel
computes it (``apply``, Triton), how PyTorch computes it (``TABLE[name].torch``: the
fused op's reference and its aten fallback) and its derivative (``TABLE[name].derivative``:
the backward).  Adding an activation is a row of ``TABLE`` and a branch of ``apply``,
both in this file."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INV_SQRT2 = 0.7071067811865476  # 1/sqrt(2): gelu's erf argument
INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2*pi): gelu's derivative, the normal density
_INV_SQRT2 = tl.constexpr(INV_SQRT2)  # the same, as a kernel may read a global


@dataclass(frozen=True)
class Activation:
    """One activation as PyTorch computes it, ``torch(v, negative_slope)``, and its
    derivative at the pre-activation ``z``, ``derivative(z, negative_slope)``, written
    with differentiable ops (for double backward)."""
    torch: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]


def _silu_derivative(z: torch.Tensor, slope: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _sigmoid_derivative(z: torch.Tensor, slope: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


TABLE = {
    "relu": Activation(lambda v, slope: F.relu(v), lambda z, slope: (z > 0).to(z.dtype)),
    "leaky_relu": Activation(lambda v, slope: F.leaky_relu(v, slope),
                             lambda z, slope: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))),
    "silu": Activation(lambda v, slope: F.silu(v), _silu_derivative),
    "gelu": Activation(lambda v, slope: F.gelu(v),  # the exact (erf) form
                       lambda z, slope: (0.5 * (1 + torch.erf(z * INV_SQRT2))
                                         + z * torch.exp(-0.5 * z * z) * INV_SQRT_2PI)),
    "tanh": Activation(lambda v, slope: torch.tanh(v), lambda z, slope: 1 - torch.tanh(z) ** 2),
    "sigmoid": Activation(lambda v, slope: torch.sigmoid(v), _sigmoid_derivative),
}
ACTIVATIONS = tuple(TABLE)


@triton.jit
def apply(v, ACTIVATION: tl.constexpr, negative_slope):
    """``ACTIVATION`` (a name of ``TABLE``, or ``""`` for none) of ``v``, as PyTorch
    computes it.  The op layer refuses any other name before a launch.
    ``negative_slope`` (float64) is rounded to ``v``'s dtype first, as PyTorch rounds the
    scalar to the dtype it computes in (float32 for the half types and float32, float64
    for float64)."""
    if ACTIVATION == "relu":
        v = tl.maximum(v, 0.0)
    elif ACTIVATION == "leaky_relu":
        # (A scalar of v's dtype made from the float as it is: compiled, a cast of the
        # float64 argument; interpreted, where the float arrives as a Python float, a
        # constant of that dtype.)
        v = tl.where(v > 0, v, v * tl.full((), negative_slope, v.dtype))
    elif ACTIVATION == "silu":
        v = v * tl.sigmoid(v)
    elif ACTIVATION == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * _INV_SQRT2))
    elif ACTIVATION == "tanh":
        v = 2.0 * tl.sigmoid(2.0 * v) - 1.0
    elif ACTIVATION == "sigmoid":
        v = tl.sigmoid(v)
    return v
