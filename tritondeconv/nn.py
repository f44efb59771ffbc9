"""``torch.nn`` modules backed by the tritondeconv ops."""
from __future__ import annotations

import torch

from .ops import conv_transpose2d

__all__ = ["ConvTranspose2d"]


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """Drop-in for ``torch.nn.ConvTranspose2d``.

    The same constructor (arguments, defaults, initialisation), parameter names and
    shapes, so state dicts load both ways; ``forward(input, output_size=None)`` as
    PyTorch's.  Like PyTorch's, it refuses a ``padding_mode`` other than ``"zeros"``.
    """

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
