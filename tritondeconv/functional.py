"""The public functions: drop-ins for ``torch.nn.functional.conv_transpose{1,2,3}d``
(PyTorch's names, argument order, defaults and argument checking), computed by the
``torch.ops.tritondeconv`` ops (see ``ops.py`` for where they run).

Each parses its integer arguments as PyTorch's functions do, then calls the op, or,
while a ``torch.func`` transform or forward-mode AD is active, the equivalent
``autograd.TransposedConv`` that carries it.
"""
from __future__ import annotations

import torch

from .arguments import check_tensor_types, parse_int_argument
from .autograd import transposed_conv

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "naive_conv_transpose2d"]


def _parse(op: str, input, weight, bias, stride, padding, output_padding, groups, dilation):
    check_tensor_types(input, weight, bias, op)
    return (parse_int_argument(stride, "stride", op), parse_int_argument(padding, "padding", op),
            parse_int_argument(output_padding, "output_padding", op), parse_int_argument(groups, "groups", op),
            parse_int_argument(dilation, "dilation", op))


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose1d`` (non-finite values as in
    ``conv_transpose2d``)."""
    args = _parse("conv_transpose1d", input, weight, bias, stride, padding, output_padding, groups, dilation)
    return transposed_conv(1, input, weight, bias, *args)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     activation=None, negative_slope=0.01, residual=None):
    """Drop-in for ``torch.nn.functional.conv_transpose2d``.

    Optionally fused into the kernel's epilogue: ``activation`` (``"relu"``,
    ``"leaky_relu"`` with ``negative_slope``, ``"silu"``, ``"gelu"``, ``"tanh"``,
    ``"sigmoid"``) applied after the bias, then ``residual`` (the output's shape) added.

    Non-finite values: a NaN or an infinity in ``input`` reaches exactly the outputs
    PyTorch's reach.  An infinite *weight* tap that meets no input pixel at the border
    is unspecified (NaN here, where it is multiplied by a masked-out zero; PyTorch's
    result depends on its backend and algorithm).
    """
    stride, padding, output_padding, groups, dilation = _parse(
        "conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups, dilation)
    return transposed_conv(2, input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                           float(negative_slope), residual)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose3d`` (non-finite values as in
    ``conv_transpose2d``)."""
    args = _parse("conv_transpose3d", input, weight, bias, stride, padding, output_padding, groups, dilation)
    return transposed_conv(3, input, weight, bias, *args)


def naive_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """The zero-insertion baseline, same signature as ``conv_transpose2d`` (forward only:
    it has no gradient of its own)."""
    args = _parse("naive_conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups, dilation)
    return torch.ops.tritondeconv.naive_conv_transpose2d(input, weight, bias, *args)

