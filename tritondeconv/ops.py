"""The op layer: ``torch.ops.tritondeconv.conv_transpose2d`` and
``torch.ops.tritondeconv.naive_conv_transpose2d``.

Both are ``torch.library.custom_op``s with a fake (meta) implementation, so meta
tensors work and ``torch.compile(fullgraph=True)`` traces through them as opaque
nodes; being opaque, each shape keeps its own autotuning under compile (see
DESIGN.md on pytorch/pytorch#164124).

Where the work runs:
  * CUDA tensors: always the Triton kernel.
  * CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernel, run by the
    Triton interpreter (this is how CI tests the kernels).
  * CPU tensors otherwise: aten's ``conv_transpose2d`` (Triton has no CPU backend).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .arguments import ConvTranspose2dArgs, as_batched, check_conv_transpose2d, check_tensor_types, output_memory_format
from .kernels.phase_gemm import INTERPRETING, phase_gemm

_SCHEMA = (
    "(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
    "int[2] output_padding=0, int groups=1, int[2] dilation=1) -> Tensor"
)


def _runs_triton(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETING)


def _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, op):
    """Check the arguments; return the batched input, the checked args and whether the
    input was unbatched."""
    x, unbatched = as_batched(input, op)
    return x, check_conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation, op), unbatched


def _empty_output(x: torch.Tensor, args: ConvTranspose2dArgs) -> torch.Tensor:
    return torch.empty(args.output_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight with output channels innermost (same logical shape, new strides), so the
    kernel's ``[C_in, C_out]`` tile of a tap is read along contiguous memory."""
    return weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias, args: ConvTranspose2dArgs, stride) -> torch.Tensor:
    """Run the kernel with the given stride (the naive op passes 1) into a new output
    laid out like the input of the call (``args``'s shape).  2-D is depth 1 of the
    kernel's three spatial axes: the 5-D views below copy nothing."""
    out = _empty_output(x, args)
    if out.numel() == 0:
        return out
    phase_gemm(
        out.unsqueeze(2), x.unsqueeze(2), _packed_weight(weight).unsqueeze(2), bias,
        (1, *stride), (0, *args.padding), (1, *args.dilation), args.groups,
        transposed=True, allow_tf32=torch.backends.cudnn.allow_tf32,
    )
    return out


@torch.library.custom_op("tritondeconv::conv_transpose2d", mutates_args=(), schema=_SCHEMA)
def _conv_transpose2d_op(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] = 1,
    padding: Sequence[int] = 0,
    output_padding: Sequence[int] = 0,
    groups: int = 1,
    dilation: Sequence[int] = 1,
) -> torch.Tensor:
    op = "conv_transpose2d"
    x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, op)
    if _runs_triton(x.device):
        out = _launch(x, weight, bias, args, args.stride)
    else:
        out = F.conv_transpose2d(x, weight, bias, args.stride, args.padding, args.output_padding, args.groups, args.dilation)
    return out.squeeze(0) if unbatched else out


def zero_insert(x: torch.Tensor, stride: tuple[int, int], output_padding: tuple[int, int]) -> torch.Tensor:
    """``x`` with ``s - 1`` zeros between pixels and ``output_padding`` zeros after the
    last one, per axis: ``[N, C, (H-1)*s_h + 1 + op_h, (W-1)*s_w + 1 + op_w]``."""
    n, c, h, w = x.shape
    (s_h, s_w), (op_h, op_w) = stride, output_padding
    up = torch.empty(
        (n, c, (h - 1) * s_h + 1 + op_h, (w - 1) * s_w + 1 + op_w),
        dtype=x.dtype, device=x.device, memory_format=output_memory_format(x),
    ).zero_()
    up[:, :, : (h - 1) * s_h + 1 : s_h, : (w - 1) * s_w + 1 : s_w] = x
    return up


@torch.library.custom_op("tritondeconv::naive_conv_transpose2d", mutates_args=(), schema=_SCHEMA)
def _naive_conv_transpose2d_op(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] = 1,
    padding: Sequence[int] = 0,
    output_padding: Sequence[int] = 0,
    groups: int = 1,
    dilation: Sequence[int] = 1,
) -> torch.Tensor:
    """The textbook method: insert zeros, then a stride-1 transposed convolution, which is
    an ordinary convolution with the flipped, transposed weight and padding
    ``d*(k-1) - p``.  It runs on the same kernel with stride 1 (one phase holding every
    tap), so against ``conv_transpose2d`` only the decomposition differs."""
    op = "naive_conv_transpose2d"
    x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, op)
    up = zero_insert(x, args.stride, args.output_padding)
    if _runs_triton(x.device):
        out = _launch(up, weight, bias, args, (1, 1))
    else:
        out = F.conv_transpose2d(up, weight, bias, 1, args.padding, 0, args.groups, args.dilation)
    return out.squeeze(0) if unbatched else out


def _fake(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, op="conv_transpose2d"):
    x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, op)
    out = _empty_output(x, args)
    return out.squeeze(0) if unbatched else out


@_conv_transpose2d_op.register_fake
def _(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _fake(input, weight, bias, stride, padding, output_padding, groups, dilation)


@_naive_conv_transpose2d_op.register_fake
def _(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _fake(input, weight, bias, stride, padding, output_padding, groups, dilation, "naive_conv_transpose2d")


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose2d``, computed by stride-phase
    decomposition in Triton (see the module docstring for where it runs)."""
    check_tensor_types(input, weight, bias, "conv_transpose2d")
    return torch.ops.tritondeconv.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)


def naive_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """The zero-insertion baseline, same signature as ``conv_transpose2d``."""
    check_tensor_types(input, weight, bias, "naive_conv_transpose2d")
    return torch.ops.tritondeconv.naive_conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
