"""Nearest-neighbour upsampling followed by a convolution, folded into one transposed
convolution (``docs/design.md``, "Folding an upsampling into the convolution").

Along one axis, with ``up(x)[j] = x[j // s]`` and a cross-correlation of kernel ``k`` and
zero padding ``p``:

    y[o] = Σ_t W[t] · up(x)[o + t - p] = Σ_i x[i] · Σ_{t : (o + t - p) // s = i} W[t].

Writing ``o = i*s - P + kk`` with ``P = k - 1 - p`` turns the inner sum into
``W'[kk] = Σ_{m < s} W[k - 1 - kk + m]``: the flipped kernel convolved with a box of
``s`` ones, ``k + s - 1`` taps long.  So ``y`` is the transposed convolution of the
*real* input with ``W'`` (stride ``s``, padding ``P``), and the stride-phase kernel gives
each output phase about ``(k + s - 1)/s`` taps instead of ``k`` (2×2 instead of 3×3 for
``s = 2, k = 3``), never writing the ``s²``-times larger upsampled tensor.  The output
sizes agree (``s*H + 2p - k + 1`` both ways); ``P >= 0`` needs ``p <= k - 1``.

Which ``nn.Upsample`` + ``nn.Conv2d`` pairs fold (``fold_refusal``) is decided here, below
both ``tritondeconv.nn.UpsampleConv2d.from_modules`` and ``tritondeconv.convert``'s passes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .arguments import SUPPORTED_DTYPES, ntuple
from .functional import conv_transpose2d, fx_proxies


def box_convolve(weight: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """Full convolution of the trailing ``len(scale)`` axes of ``weight`` with a box of
    ones, ``scale[a]`` long on axis ``a``: each such axis grows by ``scale[a] - 1``."""
    first = weight.dim() - len(scale)
    for axis, s in enumerate(scale, start=first):
        pad = [0, 0] * (weight.dim() - 1 - axis) + [s - 1, s - 1]
        padded = F.pad(weight, pad)
        length = weight.shape[axis] + s - 1
        weight = sum(padded.narrow(axis, m, length) for m in range(s))
    return weight


def transposed_weight(conv_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A convolution weight ``[C_out, C_in/g, *k]`` as the transposed-convolution weight
    ``[C_in, C_out/g, *k]`` of the same channel map, taps flipped."""
    c_out, c_in_g, *kernel = conv_weight.shape
    w = conv_weight.reshape(groups, c_out // groups, c_in_g, *kernel).transpose(1, 2)
    return w.reshape(groups * c_in_g, c_out // groups, *kernel).flip(list(range(2, 2 + len(kernel))))


def upsample_conv2d(input, weight, bias=None, scale_factor=2, padding=0, groups=1, *,
                    activation=None, negative_slope=0.01, residual=None):
    """``conv2d(interpolate(input, scale_factor, mode="nearest"), weight, bias, padding=padding,
    groups=groups)`` as one stride-phase transposed convolution, without materialising
    the upsampled tensor; differentiable in ``input``, ``weight`` and ``bias``.

    ``scale_factor``: an int >= 1 or a pair; ``padding``: zero padding of the
    convolution, at most ``kernel_size - 1`` per axis.  ``activation``,
    ``negative_slope`` and ``residual`` are fused into the epilogue as in
    ``conv_transpose2d``.
    """
    if type(input) is not torch.Tensor and fx_proxies(input, weight, bias, residual):
        return torch.overrides.handle_torch_function(
            upsample_conv2d, fx_proxies(input, weight, bias, residual), input, weight, bias, scale_factor, padding,
            groups, activation=activation, negative_slope=negative_slope, residual=residual)
    op = "upsample_conv2d"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise RuntimeError(f"{op}: expected weight to be a 4-D Conv2d weight [C_out, C_in/groups, kH, kW]")
    scale = ntuple(scale_factor, 2, "scale_factor", op)
    padding = ntuple(padding, 2, "padding", op)
    kernel = weight.shape[2:]
    if min(scale) < 1:
        raise RuntimeError(f"{op}: expected scale_factor to be a positive integer, but got scale_factor={list(scale)}")
    if min(padding) < 0 or any(p > k - 1 for p, k in zip(padding, kernel)):
        raise RuntimeError(
            f"{op}: expected 0 <= padding <= kernel_size - 1 per axis, but got padding={list(padding)} "
            f"with kernel_size={list(kernel)}"
        )
    if not isinstance(groups, int) or groups <= 0 or weight.shape[0] % groups:
        raise RuntimeError(f"{op}: groups={groups!r} must be a positive integer dividing C_out={weight.shape[0]}")
    if weight.shape[0] < groups:  # (as conv2d refuses a weight without output channels, on every device)
        raise RuntimeError(f"{op}: given groups={groups}, expected weight to be at least {groups} at dimension 0, "
                           f"but got weight of size {list(weight.shape)}")
    folded = box_convolve(transposed_weight(weight, groups), scale)
    transposed_padding = [k - 1 - p for k, p in zip(kernel, padding)]
    return conv_transpose2d(input, folded, bias, scale, transposed_padding, 0, groups, 1,
                            activation=activation, negative_slope=negative_slope, residual=residual)


def integer_scale(up: torch.nn.Upsample) -> tuple[int, int] | None:
    """The upsampler's scale as an int pair, or None when it is not a whole number."""
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor, up.scale_factor)
    if up.size is not None or len(scale) != 2 or not all(float(v).is_integer() and v >= 1 for v in scale):
        return None
    return int(scale[0]), int(scale[1])


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward, pre-forward or backward hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def fold_refusal(up: torch.nn.Upsample, conv: torch.nn.Conv2d, registrations: int) -> str | None:
    """Why a nearest ``Upsample`` followed by ``conv`` (registered ``registrations``
    times in the model) cannot be folded, or None."""
    if integer_scale(up) is None:
        return "the upsampling is not by a whole scale factor"
    if parametrize.is_parametrized(conv):
        return "the convolution is parametrized"
    if type(conv) is not torch.nn.Conv2d:
        return f"{type(conv).__name__} is a subclass with behaviour of its own"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return "the convolution is not stride 1, dilation 1, zero padding"
    if isinstance(conv.padding, str) or any(p > k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
        return "the convolution's padding is not a number at most kernel_size - 1"
    if conv.weight.dtype not in SUPPORTED_DTYPES:
        return f"its dtype {conv.weight.dtype} is not supported"
    if registrations > 1:
        return "the convolution is also used elsewhere in the model, where no upsampling precedes it"
    if has_hooks(up) or has_hooks(conv):
        return "the upsampler or the convolution has hooks, which would not see the inputs they see now"
    return None
