"""The textbook method, kept to compare against: ``torch.ops.tritondeconv.naive_conv_transpose2d``.

Insert ``s - 1`` zeros between input pixels, then run a stride-1 transposed convolution
(an ordinary convolution with the flipped, transposed weight and padding
``d*(k-1) - p``) on the same kernel as the decomposed op, at stride 1 (one phase holding
every tap), so that against ``conv_transpose2d`` only the decomposition differs.  Forward
only: it has no gradient of its own.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils import flop_counter

from .arguments import output_memory_format
from .ops import (LIBRARY, _computed, aten_transposed, conv_transpose_flops, empty_in_format, launch_transposed, prepare,
                  register_autocast)


def zero_insert(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], output_padding: Sequence[int]) -> torch.Tensor:
    """``x`` ``[N, C, *spatial]`` with ``s - 1`` zeros between pixels and
    ``output_padding`` zeros after the last one along each axis: size
    ``(n - 1)*s + 1 + output_padding`` per axis, laid out as the output of a convolution
    of ``x`` by ``weight``."""
    spatial = x.shape[2:]
    shape = (*x.shape[:2], *((n - 1) * s + 1 + extra for n, s, extra in zip(spatial, stride, output_padding)))
    up = empty_in_format(shape, x, output_memory_format(x, weight))
    up.zero_()[(slice(None), slice(None), *(slice(0, (n - 1) * s + 1, s) for n, s in zip(spatial, stride)))] = x
    return up


# (A Python kernel receives only the arguments that differ from the schema's defaults.)
def _naive(input, weight, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1, dilation=(1, 1)):
    call = prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, None, None)
    args = call.args
    x = zero_insert(call.x, weight, args.stride, args.output_padding)
    ones, zeros = (1,) * len(stride), (0,) * len(stride)
    out = _computed(
        "naive_conv_transpose2d", x.device,
        lambda: launch_transposed(x, weight, bias, args, ones),
        lambda: aten_transposed(x, weight, bias, ones, args, zeros),
        (x, weight, bias, ones, args.padding, zeros, args.groups, args.dilation),
    )
    return out.squeeze(0) if call.unbatched else out


def _naive_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1,
                dilation=(1, 1)):
    call = prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, None, None)
    out = empty_in_format(call.args.output_shape, call.x, call.args.output_format)
    return out.squeeze(0) if call.unbatched else out


LIBRARY.define(
    "naive_conv_transpose2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
    "int[2] output_padding=0, int groups=1, int[2] dilation=1) -> Tensor")
LIBRARY.impl("naive_conv_transpose2d", _naive, "CompositeExplicitAutograd")
torch.library.register_fake("tritondeconv::naive_conv_transpose2d", _naive_fake, lib=LIBRARY)
register_autocast("naive_conv_transpose2d")
# Counted as the transposed convolution it computes (the zeros it multiplies are not FLOPs of the layer).
flop_counter.register_flop_formula(torch.ops.tritondeconv.naive_conv_transpose2d)(conv_transpose_flops)
