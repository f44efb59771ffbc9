"""Argument checking and shape arithmetic for the transposed-convolution ops.

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
# The kernels index with 32-bit offsets (issue 7 lifts this).
MAX_NUMEL = 2**31 - 1


@dataclass(frozen=True)
class ConvTranspose2dArgs:
    """Checked, normalised arguments of one conv_transpose2d call (input batched)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    output_shape: tuple[int, int, int, int]


def pair(value: int | Sequence[int], name: str, op: str) -> tuple[int, int]:
    """``value`` as an (h, w) pair: an int, or a sequence of one or two ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple, torch.Size)) and len(value) in (1, 2) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
    raise RuntimeError(
        f"{op}: expected {name} to be a single integer value or a list of 2 values to match "
        f"the convolution dimensions, but got {name}={value!r}"
    )


def check_conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    output_padding: int | Sequence[int],
    groups: int,
    dilation: int | Sequence[int],
    op: str = "conv_transpose2d",
) -> ConvTranspose2dArgs:
    """Check every argument of a conv_transpose2d call; ``input`` is 4-D here."""
    _check_tensors(input, weight, bias, op)
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: expected weight to be 4-D [C_in, C_out/groups, kH, kW], but got weight of size {list(weight.shape)}")
    stride = pair(stride, "stride", op)
    padding = pair(padding, "padding", op)
    output_padding = pair(output_padding, "output_padding", op)
    dilation = pair(dilation, "dilation", op)
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

    n, c_in, h, w = input.shape
    w_in, c_out_g, k_h, k_w = weight.shape
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
    if k_h == 0 or k_w == 0:
        raise RuntimeError(f"{op}: expected a non-empty kernel, but got weight of size {list(weight.shape)}")
    if h == 0 or w == 0:
        raise RuntimeError(f"{op}: only zero-batch inputs may be empty, but got input of size {list(input.shape)}")
    c_out = c_out_g * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(f"{op}: expected bias to be 1-D with {c_out} elements, but got bias of size {list(bias.shape)}")

    h_out = output_size(h, k_h, stride[0], padding[0], dilation[0], output_padding[0])
    w_out = output_size(w, k_w, stride[1], padding[1], dilation[1], output_padding[1])
    if h_out <= 0 or w_out <= 0:
        raise RuntimeError(
            f"{op}: output size is non-positive: input {list(input.shape)} with kernel {[k_h, k_w]}, stride "
            f"{list(stride)}, padding {list(padding)}, dilation {list(dilation)}, output_padding "
            f"{list(output_padding)} gives [{h_out}, {w_out}]"
        )
    output_shape = (n, c_out, h_out, w_out)
    for name, numel in (("input", input.numel()), ("weight", weight.numel()), ("output", n * c_out * h_out * w_out)):
        if numel > MAX_NUMEL:
            raise RuntimeError(f"{op}: {name} has {numel} elements; more than 2**31 - 1 is not supported yet")
    return ConvTranspose2dArgs(stride, padding, output_padding, dilation, groups, output_shape)


def as_batched(input: torch.Tensor, op: str = "conv_transpose2d") -> tuple[torch.Tensor, bool]:
    """A 4-D view of ``input`` and whether it was unbatched ``(C, H, W)``, as PyTorch allows."""
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() == 4:
        return input, False
    raise RuntimeError(f"{op}: expected input to be 3-D (unbatched) or 4-D (batched), but got input of size {list(input.shape)}")


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
