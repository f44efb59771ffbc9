"""The tile tables of the two GEMM kernel families, and the policy that chooses between
their two paths: the data behind ``phase_gemm.configs`` and ``weight_grad.configs``.

**Paths.**  Each family multiplies a tile either on tensor cores (``tl.dot``) or by FMA
(a broadcast multiply and a sum over the reduction axis, ``common.fma_dot``).
``tl.dot`` needs both of the tile's channel sides (``PHASE_GEMM_DOT_SIDES``,
``WEIGHT_GRAD_DOT_SIDES``) at least ``DOT_MIN`` wide: a tile runs on tensor cores
exactly when they are (``uses_dot``; the kernels branch on the same rule at compile
time, and the cost model rates a tile by it).  Which paths a GEMM is offered
(``paths``) follows from its channels per group on those two sides:

* ``DOT_MIN`` or more on both: tensor-core tiles only;
* fewer on either side: tensor-core tiles, then FMA tiles (the tensor-core tiles waste
  work on the padding but run about 15× faster per product, so they come first and
  win the cost model's ties);
* one channel on each (a depthwise layer): FMA tiles only, since every MMA would waste
  255 of its 256 products.

**Tables.**  Every row is one launch configuration, its first five fields ``(BLOCK_M,
BLOCK_N, BLOCK_K, num_warps, num_stages)`` (the phase GEMM's add ``GROUP_M``).  An FMA
row holds ``CHANNELS`` in its channel sides: the tile is exactly as wide as the GEMM's
channels there, rounded up to a power of two (``fma_width``), and the row is dropped
where its product cube (which lives in registers) passes ``tuning.FMA_PRODUCTS``
(``sized``).  A table lists candidates, not answers: the launcher prunes them to the
problem and the GPU, the cost model ranks them, and the tuner times the best few; with
no GPU to rank for, a table's order stands.  The tables are chosen for Hopper (sm_90)
and valid on Ampere; a GPU generation that wants other tiles gets tables of its own
here.  The interpreter's tables hold one small tile per path: nothing can be timed
there, and small tiles keep its NumPy emulation quick.
"""
import math

import triton

from .tuning import FMA_PRODUCTS

# tl.dot's minimum tile side (an MMA is at least 16 wide along each of its sides).
DOT_MIN = 16

# The two tile sides of each family that are channels, hence must reach DOT_MIN for
# tensor cores (the third side is pixels, of any length): the phase GEMM's columns
# (produced channels) and reduction (reduced channels); the weight gradient's rows
# (input channels) and columns ((tap, output channel) pairs).
PHASE_GEMM_DOT_SIDES = ("BLOCK_N", "BLOCK_K")
WEIGHT_GRAD_DOT_SIDES = ("BLOCK_M", "BLOCK_N")

# In an FMA row, a side as wide as the GEMM's channels along it (see ``fma_width``).
CHANNELS = "channels"

# Phase GEMM, tensor cores: (BLOCK_M rows (output pixels of a phase), BLOCK_N produced
# channels, BLOCK_K reduced channels, num_warps, num_stages, GROUP_M row tiles sharing a
# column sweep for L2 reuse of the weight's tile).  Sized for Hopper from its resources (228 KiB of
# shared memory for the stages, 64-row warpgroup MMAs), not measured tile by tile (the
# sm_90 compile reports of perf/hopper_compile.py count their registers and spills, the
# tuner times them and drops those that spill; valid on Ampere).  Wide tiles for
# ordinary layers; 32- and 16-wide ones, 64 to 256 rows deep, for layers of 17-32 and
# <= 16 output channels (an RGB output layer keeps a 16-wide tensor-core tile: 13/16 of
# it is padding, still faster than FMA); 16- and 32-deep ones for few input channels.
PHASE_GEMM_DOT = (
    (128, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8), (128, 128, 32, 4, 4, 8),
    (128, 64, 64, 4, 4, 8), (64, 128, 64, 4, 4, 8), (64, 64, 64, 4, 4, 8), (128, 64, 32, 4, 5, 8),
    (128, 32, 64, 4, 4, 8), (64, 32, 64, 4, 4, 8), (128, 16, 64, 4, 4, 8), (64, 16, 128, 4, 3, 8),
    (256, 32, 32, 8, 3, 8), (128, 32, 32, 4, 4, 8), (64, 32, 32, 4, 4, 8), (128, 16, 32, 4, 4, 8),
    (64, 16, 32, 4, 4, 8), (128, 64, 16, 4, 5, 8), (64, 64, 16, 4, 4, 8), (128, 32, 16, 4, 4, 8),
    (128, 16, 16, 4, 4, 8), (64, 16, 16, 4, 4, 8), (32, 16, 16, 2, 2, 8),
)
# Phase GEMM, FMA: 128 to 1024 output pixels (4 warps, 8 for the two longest), of which
# the register model (``sized``) keeps those whose product cube fits for the channels;
# two stages; GROUP_M 1 (a tile spans all of a narrow layer's output channels: one
# column tile, nothing to share).
PHASE_GEMM_FMA = (
    (256, CHANNELS, CHANNELS, 4, 2, 1), (512, CHANNELS, CHANNELS, 8, 2, 1),
    (128, CHANNELS, CHANNELS, 4, 2, 1), (1024, CHANNELS, CHANNELS, 8, 2, 1),
)
PHASE_GEMM = {"dot": PHASE_GEMM_DOT, "fma": PHASE_GEMM_FMA}  # by path

# Weight gradient, tensor cores, deep in the pixel reduction: (BLOCK_M input channels,
# BLOCK_N (tap, output channel) columns, BLOCK_K pixels per reduction step (one box),
# num_warps, num_stages), one table per layout of the operands:
# "contiguous": channels-last tensors, whose operand tiles are 16-byte vectors along the
# channels, copied asynchronously (cp.async) and consumed by asynchronous MMAs; chosen
# for Hopper (sm_90).
# "gathered": NCHW tensors, whose channels are a plane apart: every element of the
# grad_y tile (strided by s along W) is loaded on its own with its own address, so
# these tiles keep accumulator + gathered elements per thread low (about 160
# registers): shallower than the contiguous ones since the sm_90 compile reports showed
# spills past about 200 (26 of 56 NCHW launches of the 2-D bf16 suite spilled on the
# contiguous table, none on this one).
WEIGHT_GRAD_DOT = {
    "contiguous": ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                   (128, 128, 32, 8, 4), (64, 64, 128, 4, 3), (32, 32, 128, 4, 3), (16, 16, 256, 4, 3)),
    "gathered": ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3),
                 (64, 64, 32, 4, 3), (32, 32, 64, 4, 3), (16, 16, 128, 4, 3)),
}
# Weight gradient, FMA (either layout): 64 to 1024 pixels per step (4 warps, 8 for the
# longest), of which the register model (``sized``) keeps those whose product cube fits
# for the channels; two stages.
WEIGHT_GRAD_FMA = (
    (CHANNELS, CHANNELS, 256, 4, 2), (CHANNELS, CHANNELS, 1024, 8, 2), (CHANNELS, CHANNELS, 64, 4, 2),
)
WEIGHT_GRAD = {layout: {"dot": dot, "fma": WEIGHT_GRAD_FMA} for layout, dot in WEIGHT_GRAD_DOT.items()}

# Grouped kernel (``grouped``: few channels per group, the groups side by side as the
# tile's columns; always FMA): (BLOCK_M output pixels of a phase, BLOCK_N output channels
# across the groups, BLOCK_K reduced channels per step (``CHANNELS``: as many as a group
# has, rounded up to a power of two), num_warps, num_stages).  Channels-last tiles: 16
# to 128 channels wide (32 to 256 bytes of bf16 per pixel, whole sectors), 1024 to 8192
# outputs per program (8 to 64 fp32 accumulators a thread), wider first for the many
# channels of a depthwise layer.
GROUPED = (
    (64, 64, CHANNELS, 4, 2), (32, 128, CHANNELS, 4, 2), (128, 32, CHANNELS, 4, 2), (128, 64, CHANNELS, 8, 2),
    (64, 128, CHANNELS, 8, 2), (256, 16, CHANNELS, 4, 2), (32, 64, CHANNELS, 4, 2), (16, 128, CHANNELS, 4, 2),
)
# Input elements a thread may hold for one step of the grouped kernel (its ``BLOCK_K``
# channels' tiles, loaded together), beside its accumulators.
GROUPED_STEP_ELEMENTS = 64
# The grouped kernel's two channel sides, as the phase GEMM's (never both 16 wide there:
# the kernel takes fewer than 16 reduced channels, so the cost model rates it as FMA).
GROUPED_SIDES = PHASE_GEMM_DOT_SIDES

# The interpreter's tables, by path (fields as above): one small tile per path, the
# warps and stages at ``tuning.config``'s defaults (the interpreter ignores them).
INTERPRETER_PHASE_GEMM = {"dot": ((32, 16, 16, 4, 3, 1),), "fma": ((32, CHANNELS, CHANNELS, 4, 3, 1),)}
INTERPRETER_WEIGHT_GRAD = {"dot": ((16, 16, 32, 4, 3),), "fma": ((CHANNELS, CHANNELS, 32, 4, 3),)}
INTERPRETER_GROUPED = ((16, 8, CHANNELS, 4, 3),)


def uses_dot(config: dict, sides: tuple[str, str]) -> bool:
    """Whether ``config`` multiplies on tensor cores: both of its channel ``sides``
    (a family's ``*_DOT_SIDES``) are at least ``DOT_MIN``."""
    return all(config[side] >= DOT_MIN for side in sides)


def paths(channels_a: int, channels_b: int) -> tuple[str, ...]:
    """The paths (``"dot"``, ``"fma"``) whose tiles a GEMM with these channels per group
    on its two channel sides is offered, in the order offered (see the module
    docstring)."""
    if channels_a == 1 and channels_b == 1:
        return ("fma",)
    return ("dot", "fma") if min(channels_a, channels_b) < DOT_MIN else ("dot",)


def fma_width(channels: int) -> int:
    """An FMA tile's side along ``channels``: rounded up to a power of two, at most
    ``DOT_MIN`` (a wider side could take tensor cores)."""
    return min(triton.next_power_of_2(channels), DOT_MIN)


def sized(rows: tuple, m: int | None = None, n: int | None = None, k: int | None = None) -> list[tuple]:
    """``rows`` of a table for a GEMM with ``m``, ``n``, ``k`` channels per group along
    its rows, columns and reduction (only those sides that are channels are given):
    each ``CHANNELS`` side set to ``fma_width`` of them, and the FMA rows whose product
    cube ``BLOCK_M·BLOCK_N·BLOCK_K`` passes ``FMA_PRODUCTS`` dropped."""
    out = []
    for row in rows:
        sides = tuple(fma_width(channels) if side == CHANNELS else side for side, channels in zip(row[:3], (m, n, k)))
        if CHANNELS in row[:3] and math.prod(sides) > FMA_PRODUCTS:
            continue
        out.append(sides + row[3:])
    return out
