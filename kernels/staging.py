"""A GEMM's input copied to channels-last before the GEMM reads it (staging): the Triton
kernel and its launcher.

Where a tensor's channels are strided (NCHW), the phase GEMM's input tile ``[rows,
channels]`` has no axis along which the compiler can prove the addresses contiguous and
aligned: every element is a load of its own, none goes through ``cp.async``, and the
tensor-core MMA waits on its operands every step; the weight gradient's tiles of the
input and of ``grad_y`` (channels along one side, pixels along the other) fare the same.
A channels-last copy costs one read and one write of the tensor, a transpose through
shared memory with vector loads along the pixels and vector stores along the channels;
after it the GEMM takes its channels-last pipeline.  ``phase_gemm`` (the forward, the
input gradient) and ``weight_grad`` race the two ways on a layer's first call, where
``offered``.

Grid: (pixel tiles × batch, channel tiles).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import launcher
from .common import allocated, int64_forced, spans_int64
from .tiles import DOT_MIN

# One tile for every shape: a 64 × 64 transpose, 16-byte vectors on both sides for
# 16-bit dtypes, 8 KiB of shared memory.  A copy has nothing to tune.
CONFIG = dict(BLOCK_C=64, BLOCK_P=64, num_warps=4, num_stages=1)


@triton.jit
def _channels_last_kernel(
    x_ptr, out_ptr,
    C, P,
    sxn, sxc,
    INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``out[n, p, c] = x[n, c, p]`` over one tile of channels and pixels of one image.

    x_ptr:   input ``[N, C, P]`` (its spatial axes flattened: pixel ``p`` at ``p``
             elements from the channel's first), strides ``(sxn, sxc, 1)``.
    out_ptr: output ``[N, P, C]``, contiguous.
    C, P:    channels, and pixels per image.
    sxn, sxc: the input's batch and channel strides.
    INT64_INDEX: index in 64 bits (some offset reaches 2**31); 32 bits otherwise.
    BLOCK_C, BLOCK_P: channels and pixels per program.
    """
    pixel_tiles = tl.cdiv(P, BLOCK_P)
    n = tl.program_id(0) // pixel_tiles
    p = (tl.program_id(0) % pixel_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64_INDEX:
        n = n.to(tl.int64)
        p = p.to(tl.int64)
        c = c.to(tl.int64)
    mask = (c[:, None] < C) & (p[None, :] < P)
    tile = tl.load(x_ptr + n * sxn + c[:, None] * sxc + p[None, :], mask=mask)
    tl.store(out_ptr + n * P * C + p[None, :] * C + c[:, None], tile, mask=mask)


def flat_pixels(shape: tuple, strides: tuple) -> bool:
    """Whether the spatial axes of a tensor ``[N, C, *spatial]`` of this shape and these
    strides flatten into one of unit stride (what the copy reads): they are laid out as
    in a contiguous tensor (axes of size 1 aside)."""
    expected = 1
    for size, stride in zip(reversed(shape[2:]), reversed(strides[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@functools.lru_cache(maxsize=4096)
def offered(layout: tuple, itemsize: int, groups: int) -> bool:
    """Whether a channels-last copy of a GEMM operand ``[N, C, *spatial]`` of this layout
    (``(shape, strides)``) may pay: its channels are strided, 16 or more of them per group
    (a tensor-core tile's side), the copy's rows of channels are 16-byte aligned (so the
    GEMM's loads of them are vectors), and its spatial axes are laid out as the copy
    reads them."""
    shape, strides = layout
    c = shape[1]
    return (strides[1] != 1 and c // groups >= DOT_MIN and c * itemsize % 16 == 0 and 0 not in shape
            and flat_pixels(shape, strides))


@functools.lru_cache(maxsize=1024)
def plan_launch(shape: tuple, strides: tuple, dtype: torch.dtype, int64_forced: bool) -> launcher.LaunchPlan:
    """The launch plan of ``channels_last`` for an input of this shape and these strides."""
    n, c, pixels = shape[0], shape[1], math.prod(shape[2:])
    int64 = int64_forced or spans_int64(shape, strides) or spans_int64((n * pixels * c,), (1,))  # (the copy)
    return launcher.LaunchPlan(
        scalars=(c, pixels, strides[0], strides[1]),
        constants=dict(INT64_INDEX=int64),
        grid=lambda meta: (n * -(-pixels // meta["BLOCK_P"]), -(-c // meta["BLOCK_C"])),
        key=(str(dtype), c, pixels, *strides[:2]),  # one configuration, nothing to tune: the key names the call
        configs=lambda: [CONFIG],
        problem=lambda: None,
    )


def channels_last(x: torch.Tensor) -> tuple[torch.Tensor, launcher.PreparedLaunch | None]:
    """A channels-last copy of ``x`` ``[N, C, *spatial]`` (1 to 3 spatial axes that
    ``flat_pixels`` accepts): a tensor of ``x``'s shape whose channels are contiguous; and
    the copy's prepared launch for ``repeat`` (None where it may not be kept)."""
    out = _empty_copy(x)
    plan = plan_launch(tuple(x.shape), x.stride(), x.dtype, int64_forced())
    prepared = launcher.launch(plan.request("staging", _channels_last_kernel, (x, out), x.device, out))
    return out.movedim(-1, 1), prepared


def repeat(prepared: launcher.PreparedLaunch, x: torch.Tensor) -> torch.Tensor:
    """``channels_last(x)`` with the launch it prepared for ``x``'s class of tensors."""
    out = _empty_copy(x)
    prepared.launch(x, out)
    return out.movedim(-1, 1)


def _empty_copy(x: torch.Tensor) -> torch.Tensor:
    """The copy's storage: ``[N, *spatial, C]``, contiguous."""
    return allocated(torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=x.dtype, device=x.device))
