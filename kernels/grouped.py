"""Layers of few channels per group (depthwise ones among them) with the groups as the
tile's columns: the Triton kernel and its launch plan.

The phase GEMM gives each group its own programs (grid axis 1): rows = output pixels of
a phase, columns = the group's output channels, reduction = its taps × input channels.
A depthwise layer (one channel in and one out per group) leaves it a GEMM of one column
that reduces over one channel per tap, so every program reads a single channel of its
input.  On channels-last input that channel shares each 32-byte sector with its
neighbours, which other programs read, far apart in time: the sector is fetched up to
16 times (bf16) where once would do.

Here a tile spans the channels of many groups instead.  Rows = output pixels of one
phase, columns = output channels across the groups (column ``j`` of group ``j //
C_col_g``), and each column reduces over its own group's taps × input channels: per
step an input tile ``[rows, columns]`` (column ``j`` reading input channel
``(j // C_col_g) * C_red_g + c``) times one weight per column, multiplied and added
elementwise.  There is no GEMM to share operands across the columns, and none is
needed: the layer moves more bytes than it multiplies, and on channels-last tensors
the tile's columns are contiguous, so every load and store is a vector along the
channels.  Both directions, as the phase GEMM computes them and with its per-axis maps:
transposed (the forward) and direct (its input gradient).

``phase_gemm`` races this launch against its own on a layer's first call where the
input's channels are contiguous and both sides of the GEMM are narrower than a
tensor-core tile (``offered``).

Grid: (row tiles × column tiles × phases,): the column tile varies fastest, then the
phase, so that the programs of one row tile, which read the same input pixels, run side
by side.
"""
import functools

import torch
import triton
import triton.language as tl

from . import activations, launcher
from .common import INTERPRETING
from .cost import Part, Problem
from .layer import axis_maps, layer, next_step, phase_rows
from .tiles import CHANNELS, DOT_MIN, GROUPED, GROUPED_SIDES, GROUPED_STEP_ELEMENTS, INTERPRETER_GROUPED, fma_width
from .tuning import bucket, config


def offered(c_red_g: int, c_col_g: int, groups: int, x_channels_last: bool) -> bool:
    """Whether a layer with these channels per group may run here: more than one group,
    fewer than a tensor-core tile's side of channels per group on both sides of the
    GEMM (where the phase GEMM wastes its tiles), and the input's channels contiguous
    (on NCHW input the phase GEMM's one-column tiles already read along the pixels)."""
    return groups > 1 and c_red_g < DOT_MIN and c_col_g < DOT_MIN and x_channels_last


def configs(c_red_g: int, interpreter: bool = INTERPRETING) -> list[dict]:
    """Launch configurations for a layer of ``c_red_g`` input channels per group:
    ``tiles.GROUPED``'s rows (the interpreter's: ``tiles.INTERPRETER_GROUPED``), their
    reduced-channel side (``BLOCK_K``, channels multiplied in one unrolled step) as wide
    as those channels rounded up to a power of two (``tiles.fma_width``), but no wider
    than keeps a step's input tiles (``BLOCK_M × BLOCK_N`` per channel, loaded together,
    in registers beside the accumulator) within ``tiles.GROUPED_STEP_ELEMENTS`` a thread:
    the sm_90 compile reports showed a 128×32 tile four channels deep at 255 registers,
    spilling."""
    table = INTERPRETER_GROUPED if interpreter else GROUPED
    out = []
    for bm, bn, bk, warps, stages in table:
        deepest = triton.next_power_of_2(GROUPED_STEP_ELEMENTS * 32 * warps // (bm * bn) + 1) // 2
        depth = min(fma_width(c_red_g), deepest) if bk == CHANNELS else bk
        out.append(config(bm, bn, depth, num_warps=warps, num_stages=stages))
    return out


@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr,
    N, C_red_g, C_col_g, GROUPS,
    I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw,
    swr, swc, swd, swh, sww,
    syn, syc, syd, syh, syw,
    srn, src, srd, srh, srw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W,
    G_D, G_H, G_W, INV_D, INV_H, INV_W,
    negative_slope: tl.float64,
    TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row tile, column tile) of one phase, the columns across the groups.

    The arguments are the phase GEMM's (``phase_gemm``'s kernel: pointers,
    sizes, strides, geometry, epilogue), and:

    GROUPS:  the number of groups: the tile's columns are the ``GROUPS * C_col_g``
             produced channels.
    ACC_DTYPE: the accumulator's dtype: float64 for float64 tensors, float32 otherwise.
    BLOCK_M: rows (output pixels of a phase) per tile.
    BLOCK_N: columns (produced channels, across the groups) per tile.
    BLOCK_K: reduced channels per loop step (unrolled; at most ``C_red_g`` rounded up to
             a power of two).
    """
    n_phases = S_D * S_H * S_W if TRANSPOSED else 1
    n_cols = GROUPS * C_col_g
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    pid_n = tl.program_id(0) % num_pid_n
    phase = (tl.program_id(0) // num_pid_n) % n_phases
    pid_m = tl.program_id(0) // (num_pid_n * n_phases)
    if INT64_INDEX:  # every index below derives from these, so all of it becomes 64-bit
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)

    # This program's phase (r_d, r_h, r_w) and each axis's affine maps (``layer.axis_maps``).
    r_w = phase % S_W
    r_h = (phase // S_W) % S_H
    r_d = phase // (S_W * S_H)
    kd0, kd_step, taps_d, id0, id_step, id_tap, od0, od_step, T_D = axis_maps(
        r_d, K_D, S_D, P_D, D_D, G_D, INV_D, O_D, TRANSPOSED)
    kh0, kh_step, taps_h, ih0, ih_step, ih_tap, oh0, oh_step, T_H = axis_maps(
        r_h, K_H, S_H, P_H, D_H, G_H, INV_H, O_H, TRANSPOSED)
    kw0, kw_step, taps_w, iw0, iw_step, iw_tap, ow0, ow_step, T_W = axis_maps(
        r_w, K_W, S_W, P_W, D_W, G_W, INV_W, O_W, TRANSPOSED)
    M = tl.cast(N, pid_m.dtype) * T_D * T_H * T_W

    # Rows: m = ((n*T_D + t_d)*T_H + t_h)*T_W + t_w; the grid's row tiles are laid out for
    # the largest phase, and a tile past the end of its own phase does nothing.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n, t_d, t_h, t_w = phase_rows(offs_m, T_D, T_H, T_W)
    # Input position of tap 0 for each row: i0 + t*i_step.
    in_d = id0 + t_d * id_step
    in_h = ih0 + t_h * ih_step
    in_w = iw0 + t_w * iw_step

    # Column j is produced channel j = group*C_col_g + channel, which reduces over input
    # channels group*C_red_g + c.  The weight's element (reduced c, produced channel) of
    # the group sits at row group*C_red_g + c (transposed: [C_in, C_out/groups, ...]) or
    # at row j and column c (direct: the same weight with its first two axes swapped).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    group = offs_n // C_col_g
    x_cols = (group * C_red_g) * sxc
    if TRANSPOSED:
        w_cols = w_ptr + (group * C_red_g) * swr + (offs_n % C_col_g) * swc
    else:
        w_cols = w_ptr + offs_n * swc
    x_rows = x_ptr + n * sxn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # Reduction over (tap_d, tap_h, tap_w, channel block), the channel block fastest
    # (``next_step``); tap j reads input i0 + t*i_step + j*i_tap_step through kernel
    # index kk0 + j*kk_step.
    k_blocks = tl.cdiv(C_red_g, BLOCK_K)
    n_iter = tl.where(pid_m * BLOCK_M < M, taps_d * taps_h * taps_w * k_blocks, 0)
    kb = 0
    jw = 0
    jh = 0
    jd = 0
    for _ in range(0, n_iter):
        i_d = in_d + jd * id_tap
        i_h = in_h + jh * ih_tap
        i_w = in_w + jw * iw_tap
        row_ok = mask_m & (i_d >= 0) & (i_d < I_D) & (i_h >= 0) & (i_h < I_H) & (i_w >= 0) & (i_w < I_W)
        x_tap = x_rows + i_d * sxd + i_h * sxh + i_w * sxw
        w_tap = w_cols + (kd0 + jd * kd_step) * swd + (kh0 + jh * kh_step) * swh + (kw0 + jw * kw_step) * sww
        for kc in tl.static_range(BLOCK_K):  # acc[m, j] += x[m, channel of j's c] * w[c, j]
            c = kb * BLOCK_K + kc
            cols_ok = tl.where(c < C_red_g, mask_n, False)  # (the last block's channels past C_red_g)
            a = tl.load(x_tap[:, None] + (x_cols + c * sxc)[None, :], mask=row_ok[:, None] & cols_ok[None, :],
                        other=0.0)
            b = tl.load(w_tap + c * swr, mask=cols_ok, other=0.0)
            acc += a.to(ACC_DTYPE) * b.to(ACC_DTYPE)[None, :]
        kb, jw, jh, jd = next_step(kb, jw, jh, jd, k_blocks, taps_w, taps_h)

    # Epilogue: y = activation(acc + bias) + residual, at output o0 + t*o_step.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    acc = activations.apply(acc, ACTIVATION, negative_slope)
    o_d = od0 + t_d * od_step
    o_h = oh0 + t_h * oh_step
    o_w = ow0 + t_w * ow_step
    mask_out = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_rows = r_ptr + n * srn + o_d * srd + o_h * srh + o_w * srw
        acc += tl.load(r_rows[:, None] + (offs_n * src)[None, :], mask=mask_out, other=0.0).to(ACC_DTYPE)
    y_rows = y_ptr + n * syn + o_d * syd + o_h * syh + o_w * syw
    tl.store(y_rows[:, None] + (offs_n * syc)[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask_out)


@functools.lru_cache(maxsize=4096)
def plan_launch(out_layout: tuple, x_layout: tuple, weight_layout: tuple, residual_strides: tuple | None,
                has_bias: bool, stride: tuple, padding: tuple, dilation: tuple, groups: int, transposed: bool,
                dtype: torch.dtype, activation: str, int64_forced: bool) -> launcher.LaunchPlan:
    """The launch plan of the grouped kernel for tensors of these layouts (``(shape,
    strides)`` pairs) and this geometry, from the ``layer.layer`` that the phase GEMM's
    plan reads too."""
    shape = layer(out_layout, x_layout, weight_layout, residual_strides, stride, padding, dilation, groups,
                  transposed, dtype, int64_forced)
    columns = groups * shape.c_col_g

    def grid(meta):
        return (-(-shape.m_max // meta["BLOCK_M"]) * -(-columns // meta["BLOCK_N"]) * shape.phases,)

    def problem() -> Problem:
        """The phase GEMM's parts with the groups side by side as columns (one GEMM per
        phase); tiles of fewer than 16 reduced channels, hence rated as FMA."""
        parts = [Part(1, part.rows, columns, part.depth, part.taps) for part in shape.parts()]
        return Problem(tuple(parts), dtype.itemsize, str(dtype).removeprefix("torch."), GROUPED_SIDES)

    return launcher.LaunchPlan(
        scalars=(shape.n, shape.c_red_g, shape.c_col_g, groups, *shape.scalars),
        constants=dict(
            TRANSPOSED=transposed,
            HAS_BIAS=has_bias,
            ACTIVATION=activation,
            HAS_RESIDUAL=residual_strides is not None,
            INT64_INDEX=shape.int64,
            ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        ),
        grid=grid,
        # The phase GEMM's key (the GEMM's shape class and layouts, M bucketed): the tiles
        # trade rows against columns, which both depend on.
        key=(*shape.shape_key, *shape.layout_key, bucket(shape.m_max)),
        configs=lambda: configs(shape.c_red_g),
        problem=problem,
    )


def grouped(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None, plan: launcher.LaunchPlan,
            negative_slope: float) -> launcher.PreparedLaunch | None:
    """Launch ``plan`` (this module's ``plan_launch`` for these tensors) on them: ``out``
    as ``phase_gemm.phase_gemm`` writes it; the class's prepared launch (or None where
    it may not be kept)."""
    tensors = (x, weight, x if bias is None else bias, out, out if residual is None else residual)
    return launcher.launch(plan.request("grouped", _grouped_kernel, tensors, x.device, out, trailing=(negative_slope,)))
