"""``torch.nn`` modules backed by the tritondeconv ops."""
from __future__ import annotations

import torch

from .ops import conv_transpose1d, conv_transpose2d, conv_transpose3d

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


class _TritonForward:
    """``forward(input, output_size=None)`` as PyTorch's transposed convolutions have it,
    computed by tritondeconv.  Mixed into subclasses of PyTorch's modules, which keep
    their constructor (arguments, defaults, initialisation), parameter names and shapes,
    so state dicts load both ways; like PyTorch's, they refuse a ``padding_mode`` other
    than ``"zeros"``."""

    _rank: int  # spatial axes
    _function: staticmethod  # the functional form

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._rank, self.dilation
        )
        return self._function(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class ConvTranspose1d(_TritonForward, torch.nn.ConvTranspose1d):
    """Drop-in for ``torch.nn.ConvTranspose1d``."""

    _rank, _function = 1, staticmethod(conv_transpose1d)


class ConvTranspose2d(_TritonForward, torch.nn.ConvTranspose2d):
    """Drop-in for ``torch.nn.ConvTranspose2d``."""

    _rank, _function = 2, staticmethod(conv_transpose2d)


class ConvTranspose3d(_TritonForward, torch.nn.ConvTranspose3d):
    """Drop-in for ``torch.nn.ConvTranspose3d``."""

    _rank, _function = 3, staticmethod(conv_transpose3d)
