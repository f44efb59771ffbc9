"""Argument checking and shape arithmetic for the transposed-convolution ops, for any
spatial rank (1, 2 or 3).

Every check raises the exception type PyTorch raises for the same mistake
(``RuntimeError`` for values, ``TypeError`` for a non-tensor passed to the friendly
functions; the dispatcher itself refuses a non-tensor passed to the op), with a
message that names the argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .planner import output_size

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ConvTransposeArgs:
    """Checked, normalised arguments of one transposed convolution (input batched);
    the per-axis tuples have one entry per spatial axis."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    output_shape: tuple[int, ...]


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


def check_conv_transpose(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    output_padding: int | Sequence[int],
    groups: int,
    dilation: int | Sequence[int],
    rank: int,
    op: str,
) -> ConvTransposeArgs:
    """Check every argument of a transposed convolution; ``input`` is batched here."""
    _check_tensors(input, weight, bias, op)
    if weight.dim() != rank + 2:
        raise RuntimeError(
            f"{op}: expected weight to be {rank + 2}-D [C_in, C_out/groups, *kernel_size], "
            f"but got weight of size {list(weight.shape)}"
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
        raise RuntimeError(f"{op}: negative output_padding is not supported, but got output_padding={list(output_padding)}")
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= s and op_ >= d:
            raise RuntimeError(
                f"{op}: output_padding must be smaller than either stride or dilation, but got "
                f"output_padding={list(output_padding)}, stride={list(stride)}, dilation={list(dilation)}"
            )
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, but got groups={groups}")

    n, c_in, *spatial = input.shape
    w_in, c_out_g, *kernel = weight.shape
    if w_in == 0 or w_in % groups != 0:
        raise RuntimeError(
            f"{op}: given groups={groups}, expected weight to be non-empty and divisible by {groups} "
            f"at dimension 0, but got weight of size {list(weight.shape)}"
        )
    if c_in != w_in:
        raise RuntimeError(
            f"{op}: weight of size {list(weight.shape)} expects input to have {w_in} channels, "
            f"but got input of size {list(input.shape)} with {c_in} channels"
        )
    if min(kernel) == 0:
        raise RuntimeError(f"{op}: expected a non-empty kernel, but got weight of size {list(weight.shape)}")
    if min(spatial) == 0:
        raise RuntimeError(f"{op}: only zero-batch inputs may be empty, but got input of size {list(input.shape)}")
    c_out = c_out_g * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(f"{op}: expected bias to be 1-D with {c_out} elements, but got bias of size {list(bias.shape)}")

    out_spatial = [output_size(*axis) for axis in zip(spatial, kernel, stride, padding, dilation, output_padding)]
    if min(out_spatial) <= 0:
        raise RuntimeError(
            f"{op}: output size is non-positive: input {list(input.shape)} with kernel {kernel}, stride "
            f"{list(stride)}, padding {list(padding)}, dilation {list(dilation)}, output_padding "
            f"{list(output_padding)} gives {out_spatial}"
        )
    return ConvTransposeArgs(stride, padding, output_padding, dilation, groups, (n, c_out, *out_spatial))


def check_tensor_types(input, weight, bias, op: str) -> None:
    """TypeError, as PyTorch's functional API raises, for a non-tensor argument."""
    for name, t in (("input", input), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, but got {type(t).__name__}")


def _check_tensors(input, weight, bias, op: str) -> None:
    for name, t in (("input", input), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32 and float64")
        if t.dtype != input.dtype:
            raise RuntimeError(f"{op}: expected {name} to have the input's dtype {input.dtype}, but got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: expected {name} to be on the input's device {input.device}, but got {t.device}")


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format PyTorch gives a convolution's output: the input's
    (channels_last for 4-D, channels_last_3d for 5-D, else contiguous)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
        return fmt
    return torch.contiguous_format
