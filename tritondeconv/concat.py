"""The U-Net decoder's ``torch.cat([conv_transpose(x, w), skip], dim=1)`` in one buffer:
the concatenation is allocated once, the kernel writes the convolution's output straight
into its leading channels (it writes through any output strides), and only ``skip`` is
copied, one output's worth of memory and one copy fewer than the two-step form.

PyTorch's ``out=`` arguments are not differentiable, so the block has its own backward:
the gradient of the leading channels goes to the convolution (its usual gradients,
through the ops, so they are differentiable again), the rest to ``skip``.  While a
``torch.func`` transform is active, or ``torch.compile`` traces, it is computed as the
two steps (the compiler plans its own buffers).
"""
from __future__ import annotations

import torch

from . import dispatch
from .arguments import Checked
from .functional import fx_proxies, parse_arguments
from .gradients import conv_transpose_gradients
from .layout import empty_in_format, strides_like_channels_last
from .prepared import check_forward


def _concatenation_format(up: Checked, skip: torch.Tensor) -> torch.memory_format:
    """The memory format ``torch.cat`` gives the convolution's output (its checked
    arguments ``up`` hold its shape and layout) and ``skip``: channels-last where both
    have channels-last strides (as aten's ``suggest_memory_format`` decides it),
    contiguous otherwise."""
    if len(up.output_shape) not in (4, 5) or up.output_format == torch.contiguous_format:
        return torch.contiguous_format
    both = (strides_like_channels_last(up.output_shape, up.output_strides)
            and strides_like_channels_last(skip.shape, skip.stride()))
    return up.output_format if both else torch.contiguous_format


class _ConcatTransposed(torch.autograd.Function):
    """``torch.cat([activation(T(x, w) + b), skip], 1)``, written in one buffer."""

    @staticmethod
    def forward(ctx, input, skip, weight, bias, geometry, activation, slope):
        up = check_forward(input, weight, bias, *geometry, activation, None)[0]
        up_shape = up.output_shape
        buffer = empty_in_format((up_shape[0], up_shape[1] + skip.shape[1], *up_shape[2:]), input,
                                 _concatenation_format(up, skip))
        dispatch.conv_transpose_into(buffer[:, :up_shape[1]], input, weight, bias, geometry, activation, slope, None)
        buffer[:, up_shape[1]:].copy_(skip)
        ctx.save_for_backward(input, weight, bias)
        ctx.geometry, ctx.epilogue, ctx.up_channels = geometry, (activation, slope), up_shape[1]
        return buffer

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad  # (input, skip, weight, bias, ...)
        x, w, b = ctx.saved_tensors
        grad_x, grad_w, grad_b, _ = conv_transpose_gradients(
            x, w, b, grad[:, :ctx.up_channels], ctx.geometry, *ctx.epilogue, False,
            (needs[0], needs[2], needs[3], False))
        grad_skip = grad[:, ctx.up_channels:] if needs[1] else None
        return grad_x, grad_skip, grad_w, grad_b, None, None, None


def conv_transpose_cat(input, skip, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       activation=None, negative_slope=0.01) -> torch.Tensor:
    """``torch.cat([conv_transpose(input, weight, bias, ...), skip], dim=1)`` (the rank is
    the weight's), the convolution written straight into the concatenation (see the
    module docstring); ``activation`` as for the convolution functions.  ``input`` is
    batched; ``skip`` has the convolution output's batch and spatial sizes, and the
    input's dtype and device."""
    if type(input) is not torch.Tensor and fx_proxies(input, skip, weight, bias):
        return torch.overrides.handle_torch_function(
            conv_transpose_cat, fx_proxies(input, skip, weight, bias), input, skip, weight, bias, stride, padding,
            output_padding, groups, dilation, activation=activation, negative_slope=negative_slope)
    rank = weight.dim() - 2 if isinstance(weight, torch.Tensor) else 0
    name = f"conv_transpose{rank}d"
    stride, padding, output_padding, groups, dilation = parse_arguments(
        name, rank, input, weight, bias, stride, padding, output_padding, groups, dilation)
    if input.dim() != rank + 2:
        raise RuntimeError(f"{name}: concatenating with skip needs a batched input of {rank + 2} dimensions, "
                           f"but got input of size {list(input.shape)}")
    if not isinstance(skip, torch.Tensor):
        raise TypeError(f"{name}(): argument 'skip' must be Tensor, not {type(skip).__name__}")
    geometry = (stride, padding, output_padding, groups, dilation)
    if dispatch.transforms_active() or torch.compiler.is_compiling():
        up = dispatch.conv_transpose(input, weight, bias, geometry, activation, float(negative_slope), None)
        return torch.cat([up, skip], 1)
    up_shape = check_forward(input, weight, bias, *geometry, activation, None)[0].output_shape
    if skip.dim() != rank + 2 or skip.shape[0] != up_shape[0] or tuple(skip.shape[2:]) != up_shape[2:]:
        raise RuntimeError(f"{name}: expected skip of size [{up_shape[0]}, *, {', '.join(map(str, up_shape[2:]))}] "
                           f"(the output's batch and spatial sizes), but got {list(skip.shape)}")
    if skip.dtype != input.dtype or skip.device != input.device:
        raise RuntimeError(f"{name}: expected skip to have the input's dtype and device, but got {skip.dtype} on "
                           f"{skip.device}")
    return _ConcatTransposed.apply(input, skip, weight, bias, geometry, activation, float(negative_slope))
