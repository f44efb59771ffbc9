"""Argument checking and shape arithmetic for the transposed-convolution ops, for any
spatial rank (1, 2 or 3).

Every check raises the exception type PyTorch raises for the same mistake
(``RuntimeError`` for values, ``TypeError`` for a non-tensor passed to the friendly
functions; the dispatcher itself refuses a non-tensor passed to the op), with a
message that names the argument.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .kernels.planner import output_size
from .layout import cached, format_strides, output_format

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Geometry(NamedTuple):
    """A transposed convolution's integer arguments, checked and normalised, in the order
    of the op's schema (aten's): one entry per spatial axis, ``groups`` an int."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int
    dilation: tuple[int, ...]


class Checked(NamedTuple):
    """One transposed convolution's arguments checked (the input batched): its geometry,
    and its output's shape, memory format (as aten lays out its own) and strides."""

    geometry: Geometry
    output_shape: tuple[int, ...]
    output_format: torch.memory_format
    output_strides: tuple[int, ...]


def ntuple(value: int | Sequence[int], rank: int, name: str, op: str) -> tuple[int, ...]:
    """``value`` with one entry per spatial axis: an int, or a sequence of one or
    ``rank`` ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * rank
    if isinstance(value, (list, tuple, torch.Size)) and len(value) in (1, rank) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value) * (rank // len(value))
    raise RuntimeError(
        f"{op}: expected {name} to be a single integer value or a list of {rank} values to match "
        f"the convolution dimensions, but got {name}={value!r}"
    )


def as_batched(input: torch.Tensor, rank: int, op: str) -> tuple[torch.Tensor, bool]:
    """A batched view of ``input`` and whether it was unbatched ``(C, *spatial)``, as
    PyTorch allows."""
    if input.dim() == rank + 1:
        return input.unsqueeze(0), True
    if input.dim() == rank + 2:
        return input, False
    raise RuntimeError(
        f"{op}: expected input to be {rank + 1}-D (unbatched) or {rank + 2}-D (batched), "
        f"but got input of size {list(input.shape)}"
    )


def check_conv_transpose(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                         output_padding, groups, dilation, rank: int, op: str) -> Checked:
    """Check every argument of a transposed convolution (``input`` is batched here), and
    size and lay out its output.  What is checked depends on the tensors' shapes, strides,
    dtypes and devices and on the integer arguments only, so each class of calls is
    checked once: a repeated call costs one lookup."""
    return _check(input.shape, input.stride(), input.dtype, input.device, weight.shape, weight.stride(), weight.dtype,
                  weight.device, None if bias is None else (bias.shape, bias.dtype, bias.device), _hashable(stride),
                  _hashable(padding), _hashable(output_padding), groups, _hashable(dilation), rank, op)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@cached
def _check(input_shape, input_strides, dtype, device, weight_shape, weight_strides, weight_dtype, weight_device, bias,
           stride, padding, output_padding, groups, dilation, rank: int, op: str) -> Checked:
    """``check_conv_transpose`` on the tensors' metadata (``bias``: its shape, dtype and
    device, or None), cached (a call that raises is not)."""
    for name, (t_dtype, t_device) in (("input", (dtype, device)), ("weight", (weight_dtype, weight_device)),
                                      *((("bias", bias[1:]),) if bias is not None else ())):
        if t_dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"{op}: {name} has dtype {t_dtype}; "
                               "supported dtypes are float16, bfloat16, float32 and float64")
        if t_dtype != dtype:
            raise RuntimeError(f"{op}: expected {name} to have the input's dtype {dtype}, but got {t_dtype}")
        if t_device != device:
            raise RuntimeError(f"{op}: expected {name} to be on the input's device {device}, but got {t_device}")
    bias_shape = None if bias is None else bias[0]
    if len(weight_shape) != rank + 2:
        raise RuntimeError(
            f"{op}: expected weight to be {rank + 2}-D [C_in, C_out/groups, *kernel_size], "
            f"but got weight of size {list(weight_shape)}"
        )
    stride = ntuple(stride, rank, "stride", op)
    padding = ntuple(padding, rank, "padding", op)
    output_padding = ntuple(output_padding, rank, "output_padding", op)
    dilation = ntuple(dilation, rank, "dilation", op)
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise RuntimeError(f"{op}: expected groups to be an integer, but got groups={groups!r}")
    if min(stride) <= 0:
        raise RuntimeError(f"{op}: non-positive stride is not supported, but got stride={list(stride)}")
    if min(dilation) <= 0:
        raise RuntimeError(f"{op}: non-positive dilation is not supported, but got dilation={list(dilation)}")
    if min(padding) < 0:
        raise RuntimeError(f"{op}: negative padding is not supported, but got padding={list(padding)}")
    if min(output_padding) < 0:
        raise RuntimeError(f"{op}: negative output_padding is not supported, "
                           f"but got output_padding={list(output_padding)}")
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= s and op_ >= d:
            raise RuntimeError(
                f"{op}: output_padding must be smaller than either stride or dilation, but got "
                f"output_padding={list(output_padding)}, stride={list(stride)}, dilation={list(dilation)}"
            )
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, but got groups={groups}")

    n, c_in, *spatial = input_shape
    w_in, c_out_g, *kernel = weight_shape
    if w_in == 0 or w_in % groups != 0:
        raise RuntimeError(
            f"{op}: given groups={groups}, expected weight to be non-empty and divisible by {groups} "
            f"at dimension 0, but got weight of size {list(weight_shape)}"
        )
    if c_in != w_in:
        raise RuntimeError(
            f"{op}: weight of size {list(weight_shape)} expects input to have {w_in} channels, "
            f"but got input of size {list(input_shape)} with {c_in} channels"
        )
    # PyTorch's CPU kernels refuse a weight without output channels; its CUDA ones return
    # an empty output (and zero gradients).  Neither takes an empty kernel.
    if (c_out_g == 0 and device.type != "cuda") or min(kernel) == 0:
        raise RuntimeError(f"{op}: expected a non-empty weight, but got weight of size {list(weight_shape)}")
    if min(spatial) == 0:
        raise RuntimeError(f"{op}: only zero-batch inputs may be empty, but got input of size {list(input_shape)}")
    c_out = c_out_g * groups
    if bias_shape is not None and (len(bias_shape) != 1 or bias_shape[0] != c_out):
        raise RuntimeError(f"{op}: expected bias to be 1-D with {c_out} elements, "
                           f"but got bias of size {list(bias_shape)}")

    out_spatial = [output_size(*axis) for axis in zip(spatial, kernel, stride, padding, dilation, output_padding)]
    if min(out_spatial) <= 0:
        raise RuntimeError(
            f"{op}: output size is non-positive: input {list(input_shape)} with kernel {kernel}, stride "
            f"{list(stride)}, padding {list(padding)}, dilation {list(dilation)}, output_padding "
            f"{list(output_padding)} gives {out_spatial}"
        )
    output_shape = (n, c_out, *out_spatial)
    memory_format = output_format(input_shape, input_strides, weight_shape, weight_strides, dtype == torch.float64,
                                  device.type == "cuda")
    return Checked(Geometry(stride, padding, output_padding, groups, dilation), output_shape, memory_format,
                   format_strides(output_shape, memory_format))


def _element_span(t: torch.Tensor) -> tuple[int, int]:
    """The elements of ``t``'s storage that ``t`` can reach: ``[first, last + 1)``."""
    first = t.storage_offset()
    return first, first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` lie at one memory location (an ``expand``ed tensor),
    decided by elements: the strides answer it where they can (a zero stride on an axis
    longer than 1; or each axis, by growing stride, stepping past all the smaller ones:
    no overlap), and otherwise each element's index is written through ``t``'s strides
    into a scratch buffer and read back."""
    status = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: the strides do not tell aten
    if status != 2:
        return status == 1
    reach = 0
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride <= reach:
            break
        reach += (size - 1) * stride
    else:
        return False
    first, end = _element_span(t)
    scratch = torch.full((end - first,), -1, dtype=torch.int64, device=t.device)
    view = scratch.as_strided(t.shape, t.stride())
    index = torch.arange(t.numel(), device=t.device).view(t.shape)
    return not torch.equal(view.copy_(index), index)


def shares_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some element of ``a`` and some element of ``b`` lie at one memory location
    (two tensors of one dtype), decided by elements, not storages: two slices of one
    buffer that interleave without meeting (a concatenation's parts) share none."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a_first, a_end), (b_first, b_end) = _element_span(a), _element_span(b)
    if a_end <= b_first or b_end <= a_first:
        return False
    first = min(a_first, b_first)
    marks = torch.zeros(max(a_end, b_end) - first, dtype=torch.bool, device=a.device)
    marks.as_strided(a.shape, a.stride(), a_first - first).fill_(True)
    return bool(marks.as_strided(b.shape, b.stride(), b_first - first).any())


# The positions of the integer arguments in the functional signature
# ``(input, weight, bias, stride, padding, output_padding, groups, dilation)``, counted
# from 1 as PyTorch's argument parser counts them in its messages.
INT_ARGUMENTS = {"stride": 4, "padding": 5, "output_padding": 6, "groups": 7, "dilation": 8}


def _as_int(value):
    """``value`` as a Python int if PyTorch's parser takes it as one (an int, a NumPy
    integer, a 0-d integer tensor), else None (floats, strings, bools and bool tensors
    are not integers there)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.is_floating_point()
                                            or value.is_complex() or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def parse_int_argument(value, name: str, op: str):
    """An integer argument of the functional API (``stride``, ``padding``,
    ``output_padding``, ``dilation``: an int or a sequence of ints; ``groups``: an
    int) as plain Python ints, accepting what PyTorch's functions accept and raising
    their ``TypeError`` for the rest."""
    where = f"{op}(): argument '{name}' (position {INT_ARGUMENTS[name]})"
    single = _as_int(value)
    if single is not None:
        return single
    if name == "groups":
        raise TypeError(f"{where} must be int, not {type(value).__name__}")
    if not isinstance(value, (list, tuple, torch.Size)):
        raise TypeError(f"{where} must be tuple of ints, not {type(value).__name__}")
    items = [_as_int(v) for v in value]
    for pos, (item, v) in enumerate(zip(items, value)):
        if item is None:
            raise TypeError(f"{where} must be tuple of ints, but found element of type {type(v).__name__} at pos {pos}")
    return items


def check_tensor_types(input, weight, bias, op: str) -> None:
    """TypeError, as PyTorch's functional API raises, for a non-tensor argument (the
    common case, three tensors, decided first)."""
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and (
            bias is None or isinstance(bias, torch.Tensor)):
        return
    for name, t in (("input", input), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, but got {type(t).__name__}")


