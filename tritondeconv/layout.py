"""How the ops lay out and allocate the tensors they return: as aten lays out the same
convolution's (its memory format, its strides), filled as ``kernels.common.
poison_allocations`` asks."""
from __future__ import annotations

import functools

import torch

from .kernels.common import allocated


def cached(function):
    """``function`` remembered per arguments (the last 4096), except for arguments that
    cannot be hashed, such as symbolic sizes under ``torch.compile`` with dynamic shapes,
    which are computed every time.  A call that raises is not remembered."""
    remembered = functools.lru_cache(maxsize=4096)(function)

    @functools.wraps(function)
    def call(*args):
        try:
            return remembered(*args)
        except TypeError:
            return function(*args)

    return call


@cached
def format_strides(shape, memory_format: torch.memory_format) -> tuple:
    """The strides of a new tensor of ``shape`` in ``memory_format``, as ``torch.empty``
    gives them (``channels_last`` for a 3-D shape puts the channels innermost, as
    ``empty_in_format`` lays it out: a contiguous ``[N, W, C]`` tensor, permuted)."""
    dims = len(shape)
    contiguous = memory_format == torch.contiguous_format
    order = (range(dims - 1, -1, -1) if contiguous
             else (1, *range(dims - 1, 1, -1), 0))  # innermost first: the channels, the spatial axes, the batch
    # (A contiguous layout counts an empty axis as size 1; aten's channels-last does not.)
    return strides_in_order(shape, order, clamped=contiguous or dims == 3)


def strides_in_order(shape, order, clamped: bool = False) -> tuple:
    """The strides of a dense tensor of ``shape`` whose axes lie in memory in ``order``
    (innermost first); ``clamped``: an empty axis steps as one of size 1."""
    strides, step = [0] * len(shape), 1
    for axis in order:
        strides[axis] = step
        step = step * (torch.sym_max(shape[axis], 1) if clamped else shape[axis])
    return tuple(strides)


def strides_like_channels_last(sizes, strides) -> bool:
    """Whether a 4-D or 5-D tensor of these sizes and strides has channels-last strides,
    decided exactly as aten's ``suggest_memory_format`` decides it: the strides must grow
    in the order C, W, H, (D,) N, with the ambiguous cases (a zero channel stride, size-1
    axes that leave the order open) counted as contiguous."""
    dims = len(sizes)
    if dims not in (4, 5) or strides[1] == 0:
        return False
    smallest = 0
    for d in (1, *range(dims - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def output_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format aten gives a convolution's output (and so ours): channels-last
    (``channels_last`` for 4-D, ``channels_last_3d`` for 5-D) when the batched input or
    the weight has channels-last strides, except where aten's backend for the device
    has no channels-last kernel (float64 on CUDA; float64 in 3-D on the CPU); otherwise
    contiguous.  A 1-D convolution runs in aten as a 2-D one of height 1, and its
    output has its channels innermost (``channels_last`` here, for a 3-D tensor) when
    the weight has; its input's layout does not count (aten makes it contiguous)."""
    return output_format(input.shape, input.stride(), weight.shape, weight.stride(), input.dtype == torch.float64,
                         input.is_cuda)


@cached
def output_format(input_shape, input_strides, weight_shape, weight_strides, float64: bool,
                  cuda: bool) -> torch.memory_format:
    """``output_memory_format`` from the tensors' shapes and strides, whether they are
    float64 and whether they are on CUDA (remembered per class of calls)."""
    dims = len(input_shape)
    if float64 and (cuda or dims == 5):
        return torch.contiguous_format
    if dims == 3:  # the weight as aten's 2-D convolution sees it: [C_in, C_out/g, 1, k]
        weight_shape = (*weight_shape[:2], 1, weight_shape[2])
        weight_strides = (*weight_strides[:2], weight_strides[2] * weight_shape[3], weight_strides[2])
        return (torch.channels_last if strides_like_channels_last(weight_shape, weight_strides)
                else torch.contiguous_format)
    if (strides_like_channels_last(input_shape, input_strides)
            or strides_like_channels_last(weight_shape, weight_strides)):
        return torch.channels_last if dims == 4 else torch.channels_last_3d
    return torch.contiguous_format


def empty_in_format(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A new tensor of ``shape`` in ``like``'s dtype and device and in ``memory_format``
    (``channels_last`` for a 3-D shape puts its channels innermost)."""
    return allocated(like.new_empty_strided(shape, format_strides(tuple(shape), memory_format)))


def as_aten_would(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """aten's own result ``out`` of a convolution of ``x`` by ``weight``, in the memory
    format the ops promise (aten's CPU backends sometimes pick another by heuristics of
    their own)."""
    memory_format = output_memory_format(x, weight)
    if out.stride() == format_strides(tuple(out.shape), memory_format):
        return out
    return empty_in_format(out.shape, out, memory_format).copy_(out)
