"""The textbook method, kept to compare against: ``torch.ops.tritondeconv.naive_conv_transpose2d``.

Insert ``s - 1`` zeros between input pixels, then run a stride-1 transposed convolution
(an ordinary convolution with the flipped, transposed weight and padding
``d*(k-1) - p``) on the same kernel as the decomposed op, at stride 1 (one phase holding
every tap), so that against ``conv_transpose2d`` only the decomposition differs.  Forward
only: it has no gradient of its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils import flop_counter

from .layout import empty_in_format, output_memory_format
from .prepared import check_forward, first_forward
from .registrations import LIBRARY, conv_transpose_flops, register_autocast


def zero_insert(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                output_padding: Sequence[int]) -> torch.Tensor:
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
    checked, unbatched, _ = check_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, None,
                                          None)
    g = checked.geometry
    x = zero_insert(input.unsqueeze(0) if unbatched else input, weight, g.stride, g.output_padding)
    ones, zeros = (1,) * len(g.stride), (0,) * len(g.stride)
    # The transposed convolution of the zero-inserted input at stride 1, with its output
    # exactly the layer's (a first call each time: the baseline keeps nothing prepared).
    out = first_forward(x, weight, bias, (ones, g.padding, zeros, g.groups, g.dilation), None, 0.01, None,
                        out=empty_in_format(checked.output_shape, x, checked.output_format))[0]
    return out.squeeze(0) if unbatched else out


def _naive_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1,
                dilation=(1, 1)):
    checked, unbatched, _ = check_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, None,
                                          None)
    out = empty_in_format(checked.output_shape, input, checked.output_format)
    return out.squeeze(0) if unbatched else out


LIBRARY.define(
    "naive_conv_transpose2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
    "int[2] output_padding=0, int groups=1, int[2] dilation=1) -> Tensor")
LIBRARY.impl("naive_conv_transpose2d", _naive, "CompositeExplicitAutograd")
torch.library.register_fake("tritondeconv::naive_conv_transpose2d", _naive_fake, lib=LIBRARY)
register_autocast("naive_conv_transpose2d")
# Counted as the transposed convolution it computes (the zeros it multiplies are not FLOPs of the layer).
flop_counter.register_flop_formula(torch.ops.tritondeconv.naive_conv_transpose2d)(conv_transpose_flops)
