"""Initialisers for transposed-convolution weights ``[C_in, C_out/groups, *kernel_size]``."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .arguments import ntuple
from .folding import box_convolve


def _bilinear_1d(size: int, dtype, device) -> torch.Tensor:
    """FCN's 1-D interpolation kernel: a triangle of half-width ``factor = ceil(size/2)``."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=dtype, device=device)
    return 1 - (og - center).abs() / factor


@torch.no_grad()
def bilinear_(weight: torch.Tensor) -> torch.Tensor:
    """Fill ``weight`` in place with the fixed bilinear-upsampling kernel FCN (Long et al.,
    2015) initialises its learnable upsampling with: channel ``c`` maps to channel ``c``
    through the outer product of triangle kernels, every other entry is zero.

    With ``kernel_size = 2*s - s % 2``, ``stride = s`` and ``padding = s // 2`` (output
    size ``s*H``) the transposed convolution reproduces
    ``F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`` away from the
    border.  Needs ``in_channels == out_channels`` (or a depthwise weight).
    """
    c_in, c_out_g, *kernel = weight.shape
    if c_out_g != 1 and c_in != c_out_g:
        raise ValueError(
            "bilinear_: needs in_channels == out_channels (groups=1, or depthwise), "
            f"but got weight of size {list(weight.shape)}"
        )
    kernel_nd = _bilinear_1d(kernel[0], weight.dtype, weight.device)
    for size in kernel[1:]:
        kernel_nd = kernel_nd[..., None] * _bilinear_1d(size, weight.dtype, weight.device)
    weight.zero_()
    channels = torch.arange(c_in, device=weight.device)
    weight[channels, channels if c_out_g > 1 else 0] = kernel_nd  # depthwise: each channel's one output
    return weight


@torch.no_grad()
def icnr_(
    weight: torch.Tensor,
    scale: int | Sequence[int],
    init: Callable[[torch.Tensor], torch.Tensor] = torch.nn.init.kaiming_normal_,
) -> torch.Tensor:
    """Fill ``weight`` in place with ICNR (Aitken et al., 2017, "Checkerboard artifact free
    sub-pixel convolution"), for a transposed convolution of stride ``scale``.

    ICNR initialises a sub-pixel layer as nearest-neighbour upsampling followed by a
    convolution ``W0`` drawn with ``init``, so every output phase starts out with the
    same response and no checkerboard.  For a transposed convolution that is
    ``W = W0 ⊛ box(scale)`` (``tritondeconv.folding``): ``W0`` has ``k - s + 1`` taps per
    axis, and the taps of each phase of ``W`` sum to ``sum(W0)``, so a constant input
    gives a constant output away from the border.  Needs ``kernel_size >= scale``.
    """
    c_in, c_out_g, *kernel = weight.shape
    scale = ntuple(scale, len(kernel), "scale", "icnr_")
    if any(k < s for k, s in zip(kernel, scale)) or min(scale) < 1:
        raise ValueError("icnr_: needs 1 <= scale <= kernel_size per axis, "
                         f"but got scale={list(scale)}, kernel_size={kernel}")
    w0 = init(torch.empty(c_in, c_out_g, *(k - s + 1 for k, s in zip(kernel, scale)),
                          dtype=weight.dtype, device=weight.device))
    return weight.copy_(box_convolve(w0, scale))
