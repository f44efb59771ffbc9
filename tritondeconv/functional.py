"""The public functions: drop-ins for ``torch.nn.functional.conv_transpose{1,2,3}d``
(PyTorch's names, argument order, defaults and argument checking), computed by the
``torch.ops.tritondeconv.conv_transpose`` op (see ``ops.py`` for where it runs), each
with the optional fused epilogue.

The three are made by one definition (``_conv_transpose_function``): each parses its
integer arguments as PyTorch's functions do, then calls the op (``dispatch``: on plain
tensors the short way, under a ``torch.func`` transform or forward-mode AD through the
op's ``gradients.ConvTranspose``, which carries it).
"""
from __future__ import annotations

import torch

from . import (
    baselines,  # noqa: F401  (registers naive_conv_transpose2d)
    dispatch,
)
from .arguments import check_tensor_types, ntuple, parse_int_argument

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "naive_conv_transpose2d"]

_DOC = """Drop-in for ``torch.nn.functional.conv_transpose{rank}d``.

    Optionally fused into the kernel's epilogue: ``activation`` (``"relu"``,
    ``"leaky_relu"`` with ``negative_slope``, ``"silu"``, ``"gelu"``, ``"tanh"``,
    ``"sigmoid"``) applied after the bias, then ``residual`` (the output's shape) added.

    ``out``: for inference, the result written into this tensor (any strides, a slice of
    a larger one among them) and returned, by PyTorch's ``out=`` rules: the output's
    shape (an empty tensor is resized), the input's dtype and device, no memory shared
    with an argument, and an error where autograd would have to record the call.

    Non-finite values: a NaN or an infinity in ``input`` reaches exactly the outputs
    PyTorch's reach.  An infinite *weight* tap that meets no input pixel at the border
    is unspecified (NaN here, where it is multiplied by a masked-out zero; PyTorch's
    result depends on its backend and algorithm).
    """


def _per_axis(value, rank: int):
    """``value`` as one int per axis when it plainly is an int or ``rank`` of them (the
    common case, decided quickly), else None."""
    kind = type(value)
    if kind is int:
        return (value,) * rank
    if (kind is tuple or kind is list) and len(value) == rank:
        for v in value:
            if type(v) is not int:
                return None
        return value if kind is tuple else tuple(value)
    return None


def parse_arguments(op: str, rank: int, input, weight, bias, stride, padding, output_padding, groups,
                    dilation) -> tuple:
    """The integer arguments as the op takes them, in its order ``(stride, padding,
    output_padding, groups, dilation)``, one entry per spatial axis, after PyTorch's
    functional API's own type checks."""
    check_tensor_types(input, weight, bias, op)
    fast = (_per_axis(stride, rank), _per_axis(padding, rank), _per_axis(output_padding, rank), groups,
            _per_axis(dilation, rank))
    if type(groups) is int and None not in fast:
        return fast
    return (*(ntuple(parse_int_argument(value, name, op), rank, name, op) for value, name in
              ((stride, "stride"), (padding, "padding"), (output_padding, "output_padding"))),
            parse_int_argument(groups, "groups", op), ntuple(parse_int_argument(dilation, "dilation", op), rank,
                                                              "dilation", op))


def fx_proxies(*values) -> tuple:
    """The ``torch.fx`` proxies among ``values``.  A public function called on one while
    ``torch.fx.symbolic_trace`` traces hands the call to it (``__torch_function__``),
    which records it as one node of the graph, as it records PyTorch's own functions;
    the public functions check for proxies only where ``input`` is not a plain tensor."""
    return tuple(v for v in values if isinstance(v, torch.fx.Proxy))


def _conv_transpose_function(rank: int):
    name = f"conv_transpose{rank}d"

    def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       activation=None, negative_slope=0.01, residual=None, out=None):
        if type(input) is not torch.Tensor and fx_proxies(input, weight, bias, residual, out):
            return torch.overrides.handle_torch_function(
                conv_transpose, fx_proxies(input, weight, bias, residual, out), input, weight, bias, stride, padding,
                output_padding, groups, dilation, activation=activation, negative_slope=negative_slope,
                residual=residual, out=out)
        geometry = parse_arguments(name, rank, input, weight, bias, stride, padding, output_padding, groups, dilation)
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{name}(): argument 'out' must be Tensor, not {type(out).__name__}")
            return dispatch.conv_transpose_into(out, input, weight, bias, geometry, activation, float(negative_slope),
                                                residual)
        return dispatch.conv_transpose(input, weight, bias, geometry, activation, float(negative_slope), residual)

    conv_transpose.__name__ = conv_transpose.__qualname__ = name
    conv_transpose.__doc__ = _DOC.format(rank=rank)
    return conv_transpose


conv_transpose1d = _conv_transpose_function(1)
conv_transpose2d = _conv_transpose_function(2)
conv_transpose3d = _conv_transpose_function(3)


def naive_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """The zero-insertion baseline, same signature as ``conv_transpose2d`` (forward only:
    it has no gradient of its own)."""
    if type(input) is not torch.Tensor and fx_proxies(input, weight, bias):
        return torch.overrides.handle_torch_function(naive_conv_transpose2d, fx_proxies(input, weight, bias), input,
                                                     weight, bias, stride, padding, output_padding, groups, dilation)
    args = parse_arguments("naive_conv_transpose2d", 2, input, weight, bias, stride, padding, output_padding, groups,
                           dilation)
    return torch.ops.tritondeconv.naive_conv_transpose2d.default(input, weight, bias, *args)
