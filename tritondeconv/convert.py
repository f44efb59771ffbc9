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


def convert(model: torch.nn.Module) -> int:
    """Replace every ``torch.nn.ConvTranspose{1,2,3}d`` inside ``model`` by
    ``tritondeconv.nn.ConvTranspose{1,2,3}d`` (same parameters) and return how many
    were swapped.  Modules it cannot take are left as they are, named in one warning."""
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
    if left:
        warnings.warn(f"tritondeconv.convert left {len(left)} module(s) unchanged: " + "; ".join(left), stacklevel=2)
    return swapped
