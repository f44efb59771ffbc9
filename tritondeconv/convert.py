"""``convert(model)``: swap PyTorch's transposed convolutions for tritondeconv's, in place."""
from __future__ import annotations

import warnings

import torch

from . import nn
from .arguments import SUPPORTED_DTYPES

# PyTorch's module -> ours.
SWAPS = {
    torch.nn.ConvTranspose1d: nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d: nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d: nn.ConvTranspose3d,
}
_OURS = tuple(SWAPS.values())


def _refusal(module: torch.nn.modules.conv._ConvTransposeNd) -> str | None:
    """Why ``module`` cannot be swapped, or None."""
    if isinstance(module.weight, torch.nn.parameter.UninitializedParameter):
        return "its parameters are not initialised yet"
    if type(module) not in SWAPS:
        return f"{type(module).__name__} is a subclass with behaviour of its own"
    if module.weight.dtype not in SUPPORTED_DTYPES:
        return f"its dtype {module.weight.dtype} is not supported"
    return None


def _swap(module: torch.nn.modules.conv._ConvTransposeNd) -> torch.nn.Module:
    new = SWAPS[type(module)](
        module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
        padding=module.padding, output_padding=module.output_padding, groups=module.groups,
        bias=module.bias is not None, dilation=module.dilation, padding_mode=module.padding_mode,
        device="meta",
    )
    # The very same parameters: values, device, dtype and optimizer references are kept.
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def _integer_scale(up: torch.nn.Upsample) -> tuple[int, int] | None:
    """The upsampler's scale as an int pair, or None when it is not a whole number."""
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor, up.scale_factor)
    if up.size is not None or len(scale) != 2 or not all(float(v).is_integer() and v >= 1 for v in scale):
        return None
    return int(scale[0]), int(scale[1])


def _fold_refusal(up: torch.nn.Upsample, conv: torch.nn.Conv2d) -> str | None:
    """Why a nearest ``Upsample`` followed by ``conv`` cannot be folded, or None."""
    if _integer_scale(up) is None:
        return "the upsampling is not by a whole scale factor"
    if type(conv) is not torch.nn.Conv2d:
        return f"{type(conv).__name__} is a subclass with behaviour of its own"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return "the convolution is not stride 1, dilation 1, zero padding"
    if isinstance(conv.padding, str) or any(p > k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
        return "the convolution's padding is not a number at most kernel_size - 1"
    if conv.weight.dtype not in SUPPORTED_DTYPES:
        return f"its dtype {conv.weight.dtype} is not supported"
    return None


def _fold(up: torch.nn.Upsample, conv: torch.nn.Conv2d) -> nn.UpsampleConv2d:
    new = nn.UpsampleConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, scale_factor=_integer_scale(up),
        padding=conv.padding, groups=conv.groups, bias=conv.bias is not None, device="meta",
    )
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _fold_upsamples(model: torch.nn.Module, left: list[str]) -> int:
    """Fold every ``Upsample(mode="nearest")`` directly followed by a ``Conv2d`` inside an
    ``nn.Sequential``: the upsampler becomes ``Identity`` and the convolution an
    ``UpsampleConv2d`` holding the same parameters (under the same state-dict keys)."""
    folded = 0
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, torch.nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            up, conv = seq._modules[a], seq._modules[b]
            if not (isinstance(up, torch.nn.Upsample) and up.mode == "nearest" and isinstance(conv, torch.nn.Conv2d)):
                continue
            if isinstance(conv, nn.UpsampleConv2d):
                continue
            why = _fold_refusal(up, conv)
            if why is None:
                seq._modules[a], seq._modules[b] = torch.nn.Identity(), _fold(up, conv)
                folded += 1
            else:
                left.append(f"{seq_name + '.' if seq_name else ''}{a}+{b} ({why})")
    return folded


def convert(model: torch.nn.Module, fold_upsample: bool = False) -> int:
    """Replace every ``torch.nn.ConvTranspose{1,2,3}d`` inside ``model`` by
    ``tritondeconv.nn.ConvTranspose{1,2,3}d`` (same parameters), and with
    ``fold_upsample`` every nearest ``Upsample`` + ``Conv2d`` pair inside an
    ``nn.Sequential`` by ``Identity`` + ``tritondeconv.nn.UpsampleConv2d``; return how many
    modules were swapped or pairs folded.  What it cannot take is left as it is, named
    in one warning."""
    swapped, left = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.modules.conv._ConvTransposeNd) or isinstance(child, _OURS):
                continue
            why = _refusal(child)
            if why is None:
                setattr(parent, name, _swap(child))
                swapped += 1
            else:
                left.append(f"{parent_name + '.' if parent_name else ''}{name} ({why})")
    if fold_upsample:
        swapped += _fold_upsamples(model, left)
    if left:
        warnings.warn(f"tritondeconv.convert left {len(left)} module(s) unchanged: " + "; ".join(left), stacklevel=2)
    return swapped
