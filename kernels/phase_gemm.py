"""Convolutions as implicit GEMMs over stride phases: the Triton kernel and its launcher.

One kernel computes both directions, over three spatial axes (2-D is depth 1):

* **transposed** (``TRANSPOSED=True``): ``conv_transpose`` by stride-phase decomposition.
  Along an axis, output ``o`` with ``q = o + p`` has phase ``r = q % s`` and ``u = q // s``;
  only the taps with ``kk*d ≡ r (mod s)`` meet a real input pixel, at ``x[u - (kk*d - r)/s]``.
  Each phase is a dense stride-1 convolution of the real input: no zero is inserted,
  loaded or multiplied, and a phase with no taps reduces over nothing (bias only).
* **direct** (``TRANSPOSED=False``): the ordinary strided convolution
  ``y[o] = Σ x[o*s - p + kk*d] · w[kk]`` (one phase), which is conv_transpose's input
  gradient.

Both are the same loop.  Per axis, row ``t`` of a phase writes output ``o0 + t*o_step``
and, through its ``j``-th tap (kernel index ``kk0 + j*kk_step``), reads input
``i0 + t*i_step + j*i_tap_step``:

    transposed phase r:  o0 = u0*s - p + r, o_step = s, i0 = u0 - off0, i_step = 1,
                         i_tap_step = -d/g, kk0 = first tap, kk_step = s/g   (g = gcd(d, s))
    direct:              o0 = 0, o_step = 1, i0 = -p, i_step = s, i_tap_step = d,
                         kk0 = 0, kk_step = 1

The implicit GEMM per (phase, group): rows = (n, t_d, t_h, t_w), columns = the group's
output channels, reduction = (tap_d, tap_h, tap_w, input channel).  One launch covers
every phase and group: grid = (row tiles × column tiles × phases, group).

The candidate tiles are data, in ``tiles``: the tensor-core and FMA tables chosen for
Hopper (``tiles.PHASE_GEMM``), the interpreter's, and the rule that decides which paths
a layer's channels take (``tiles.paths``); ``configs`` sizes the rows to the layer and
adds the variants' tiles.

Variants of the transposed direction are tuner candidates beside it (``configs``): the
layer as one GEMM where each output gathers one (input, tap) pair (``ONE_GEMM``, k = s),
the phases side by side as columns (``PHASE_COLUMNS``, few output channels), and each
tap's input tile read as a box by Hopper's TMA (``TMA_W``, experimental).  On NCHW
input, the launcher also races the kernel on a channels-last copy of its input
(``staging``); on a channels-last layer of few channels per group, against the kernel
that puts the groups side by side (``grouped``).

The weight is always in conv_transpose's layout ``[C_in, C_out/groups, kD, kH, kW]``
(any strides); the direct convolution reads it with the first two axes swapped
(columns = C_in).
``planner`` does the transposed arithmetic in plain Python.
"""
import functools
import itertools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import activations, grouped, launcher, staging
from .common import (
    INTERPRETING,
    experimental,
    fma_dot,
    input_precision,
    int64_forced,
    operand_dtype,
    padded,
)
from .cost import Part, Problem
from .layer import axis_maps, layer, next_step, phase_rows
from .tiles import DOT_MIN, INTERPRETER_PHASE_GEMM, PHASE_GEMM, PHASE_GEMM_DOT_SIDES, paths, sized, uses_dot
from .tuning import bucket, config

# The compile-time constants that select a variant of the kernel (neither set: the phase
# GEMMs with pointer loads).
VARIANTS = ("ONE_GEMM", "TMA_W", "PHASE_COLUMNS")


def configs(c_red: int, c_col: int, one_gemm_columns: int = 0, tma_width: int = 0, phase_columns: int = 0,
            interpreter: bool = INTERPRETING) -> list[dict]:
    """Launch configurations to choose from for a GEMM that reduces over ``c_red``
    channels per group and produces ``c_col`` (the launcher prunes them to the problem
    and the GPU and the cost model ranks them; with no GPU to rank for, the order here
    stands: tensor cores first).  Where the layer is also one GEMM of
    ``one_gemm_columns`` columns (``ONE_GEMM``; 0: it is not), that variant's
    configurations follow each of the phase GEMM's, alternately, so that the cost
    model's ties put both in front of the tuner.  Where the launcher allows the
    experimental TMA variant (``tma_width``: the widest patch of rows along W, 0: not
    allowed), each tensor-core tile also comes as a patch ``min(BLOCK_M, tma_width)``
    rows wide (``TMA_W``), after its pointer-load twin.

    The tiles are ``tiles.PHASE_GEMM``'s, on the paths that ``tiles.paths`` offers for
    the channels (``tl.dot`` needs tiles of at least ``tiles.DOT_MIN`` a side):

    * tensor cores (``tl.dot``) for ordinary layers: Hopper-sized tiles (up to
      256×128, 64-deep, 3–5 stages), narrow ones for few output channels and shallow
      ones for few input channels;
    * FMA (a broadcast multiply and a sum over the reduction axis) when either side has
      fewer than 16 channels, with tiles exactly as wide as the channels (rounded up
      to a power of two): a depthwise layer (one channel in, one out per group) would
      waste 255/256 of every MMA, so it gets only FMA tiles; a layer with one narrow
      side gets both, tensor-core tiles first (they waste work on the padding but run
      about 15× faster per product).

    Where the layer also runs with its phases side by side as ``phase_columns``
    columns (``PHASE_COLUMNS``; 0: it does not), that variant's tiles, sized to those
    columns, follow in the same alternation.

    ``interpreter``: the list for the Triton interpreter (nothing can be timed there):
    ``tiles.INTERPRETER_PHASE_GEMM``, one small tile per path.
    """
    tiles = _tiles(c_red, c_col, interpreter)
    plain = dict(ONE_GEMM=False, TMA_W=0, PHASE_COLUMNS=False)
    phases = [dict(c, **plain) for c in tiles]
    variants = []
    if one_gemm_columns:
        variants.append([dict(c, **{**plain, "ONE_GEMM": True}) for c in _tiles(c_red, one_gemm_columns, interpreter)])
    if tma_width:
        variants.append([dict(c, **{**plain, "TMA_W": min(c["BLOCK_M"], tma_width)}) for c in tiles
                         if uses_dot(c, PHASE_GEMM_DOT_SIDES)])
    if phase_columns:
        variants.append([dict(c, **{**plain, "PHASE_COLUMNS": True})
                         for c in _tiles(c_red, phase_columns, interpreter)])
    return [c for group in itertools.zip_longest(phases, *variants) for c in group if c is not None]


def _tiles(c_red: int, c_col: int, interpreter: bool) -> list[dict]:
    """The tiles of ``configs`` for one GEMM shape: the rows of each offered path's
    table, sized to the channels (``tiles.sized``: columns ``c_col``, reduction ``c_red``)."""
    table = INTERPRETER_PHASE_GEMM if interpreter else PHASE_GEMM
    return [config(bm, bn, bk, num_warps=warps, num_stages=stages, GROUP_M=group_m)
            for path in paths(c_red, c_col)
            for bm, bn, bk, warps, stages, group_m in sized(table[path], n=c_col, k=c_red)]


@triton.jit
def _inside(o_row, o_col, size):
    """Whether output positions ``o_row[m] + o_col[j]`` lie in ``[0, size)``, as a
    ``[rows, columns]`` mask."""
    o = o_row[:, None] + o_col[None, :]
    return (o >= 0) & (o < size)


@triton.jit
def _phase_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr,
    N, C_red_g, C_col_g,
    I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw,
    swr, swc, swd, swh, sww,
    syn, syc, syd, syh, syw,
    srn, src, srd, srh, srw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W,
    G_D, G_H, G_W, INV_D, INV_H, INV_W,
    negative_slope: tl.float64,
    TRANSPOSED: tl.constexpr,
    ONE_GEMM: tl.constexpr,
    PHASE_COLUMNS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_W: tl.constexpr,
):
    """One (row tile, column tile) of one phase of one group.

    x_ptr:   input ``[N, groups*C_red_g, I_D, I_H, I_W]``, strides ``(sxn, sxc, sxd, sxh, sxw)``.
    w_ptr:   weight; element (reduction channel c, column channel j, tap) of group g at
             ``g*C_in_g*sw_in + c*swr + j*swc + kd*swd + kh*swh + kw*sww``, where the
             group's first input channel ``g*C_in_g`` is reduced over (``swr``) when
             transposed and produced (``swc``) by the direct convolution.
    b_ptr:   bias ``[groups*C_col_g]``, contiguous (read only when ``HAS_BIAS``).
    y_ptr:   output ``[N, groups*C_col_g, O_D, O_H, O_W]``, strides ``(syn, syc, syd, syh, syw)``.
    r_ptr:   residual, shaped like the output, strides ``(srn, ..., srw)`` (read only when
             ``HAS_RESIDUAL``).
    N:       batch size.
    C_red_g, C_col_g: channels per group reduced over (input) and produced (output).
    I_*, O_*: input and output spatial sizes.
    K_*, S_*, P_*, D_*: kernel size, stride, padding, dilation per axis.
    G_*:     ``gcd(D, S)`` per axis (transposed only).
    INV_*:   inverse of ``D/G`` modulo ``S/G`` per axis, 0 when ``S/G == 1`` (transposed only).
    negative_slope: the slope of ``leaky_relu`` (unused by the other activations), passed
             as a float64 whatever the tensors' dtype (an unannotated Python float would
             reach the kernel rounded to float32) and rounded in the epilogue to the
             accumulator's dtype, as PyTorch rounds its scalar to the op's compute type.
    TRANSPOSED: transposed (phase-decomposed) or direct convolution.
    ONE_GEMM: (transposed; the launcher offers it only where every output gathers
             exactly one (input pixel, tap) pair, as with kernel size = stride and no
             padding) the whole layer as one GEMM without phases: rows = input pixels,
             columns = (tap, output channel), reading each input tile once; each result
             goes to ``o = i*s - p + kk*d`` (a pixel shuffle in the store).
    PHASE_COLUMNS: (transposed, dilation 1; the launcher offers it for fewer than 16
             output channels per group) the phases side by side as columns: rows = the
             positions ``u`` every phase shares (``u`` in ``[p//s, (O-1+p)//s]``), columns =
             (phase r, output channel), reduction = (tap j, input channel) over
             ``ceil(k/s)`` taps per axis.  With dilation 1 each phase's first tap is
             ``kk = r`` and reads ``x[u]`` (``off0 = 0``), so tap ``j`` of every phase
             reads the same ``x[u - j]``: one input tile serves all the phases' columns
             (read once instead of once per phase), and a layer of 3 output channels
             fills 12 of a 16-wide tile's columns at stride 2 instead of 3.  Column
             ``(r, c)`` multiplies ``w[..., r + j*s]`` where that tap exists (zero
             where ``r + j*s >= k``) and writes ``o = u*s - p + r`` (a pixel shuffle in
             the store, outputs outside ``[0, O)`` dropped).
    HAS_BIAS: add the bias in the epilogue.
    ACTIVATION: apply this activation after the bias (``""``: none; see ``activations``).
    HAS_RESIDUAL: add the residual after the activation.
    INT64_INDEX: index in 64 bits (some offset reaches 2**31); 32 bits otherwise.
    OPERAND_DTYPE: dtype the tiles are fed to ``tl.dot`` in (``common.operand_dtype``).
    INPUT_PRECISION: ``"tf32"`` or ``"ieee"`` for fp32 operands.
    BLOCK_M, BLOCK_N, BLOCK_K: tile of rows, columns (produced channels; with ``ONE_GEMM``
             (tap, channel) pairs), reduced channels; all of at least 16 multiply on
             tensor cores (``tl.dot``), smaller ones by FMA (see ``configs``).
    GROUP_M: row tiles that share a column sweep (L2 reuse of the weight tile).
    TMA_W:   0: rows are gathered with pointer loads.  Otherwise (experimental; transposed,
             channels-contiguous input, the launcher checks the hardware's limits) a row
             tile is a ``BLOCK_M/TMA_W × TMA_W`` patch of one output phase of one image
             (depth slice), and each tap's input tile is one box of the input, fetched by
             the tensor memory accelerator with zero fill past the borders.
    """
    # The phase varies fastest: the s^d programs of one (row tile, column tile) run side
    # by side and read overlapping input rows (the same rows when k == s), which they
    # then find in L2 instead of each fetching them from memory.
    n_phases = S_D * S_H * S_W if TRANSPOSED and not ONE_GEMM and not PHASE_COLUMNS else 1
    pid = tl.program_id(0) // n_phases
    phase = tl.program_id(0) % n_phases
    group = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64_INDEX:  # every index below derives from these, so all of it becomes 64-bit
        pid = pid.to(tl.int64)
        group = group.to(tl.int64)
        offs_k = offs_k.to(tl.int64)

    # This program's phase (r_d, r_h, r_w) and each axis's affine maps.
    r_w = phase % S_W
    r_h = (phase // S_W) % S_H
    r_d = phase // (S_W * S_H)
    if ONE_GEMM:  # rows t = the input pixels i, outputs i*s - p (plus the column's tap, below)
        kd0, kd_step, taps_d, id0, id_step, id_tap, od0, od_step, T_D = 0, 1, 1, 0, 1, 0, -P_D, S_D, I_D
        kh0, kh_step, taps_h, ih0, ih_step, ih_tap, oh0, oh_step, T_H = 0, 1, 1, 0, 1, 0, -P_H, S_H, I_H
        kw0, kw_step, taps_w, iw0, iw_step, iw_tap, ow0, ow_step, T_W = 0, 1, 1, 0, 1, 0, -P_W, S_W, I_W
        n_cols = C_col_g * K_D * K_H * K_W
    elif PHASE_COLUMNS:  # rows t = u - p//s; tap j reads x[u - j] through kk = r + j*s; outputs u*s - p (+ r)
        kd0, kd_step, taps_d, id0, id_step, id_tap, od0, od_step, T_D = (
            0, S_D, tl.cdiv(K_D, S_D), P_D // S_D, 1, -1, (P_D // S_D) * S_D - P_D, S_D,
            (O_D - 1 + P_D) // S_D - P_D // S_D + 1)
        kh0, kh_step, taps_h, ih0, ih_step, ih_tap, oh0, oh_step, T_H = (
            0, S_H, tl.cdiv(K_H, S_H), P_H // S_H, 1, -1, (P_H // S_H) * S_H - P_H, S_H,
            (O_H - 1 + P_H) // S_H - P_H // S_H + 1)
        kw0, kw_step, taps_w, iw0, iw_step, iw_tap, ow0, ow_step, T_W = (
            0, S_W, tl.cdiv(K_W, S_W), P_W // S_W, 1, -1, (P_W // S_W) * S_W - P_W, S_W,
            (O_W - 1 + P_W) // S_W - P_W // S_W + 1)
        n_cols = C_col_g * S_D * S_H * S_W
    else:
        kd0, kd_step, taps_d, id0, id_step, id_tap, od0, od_step, T_D = axis_maps(
            r_d, K_D, S_D, P_D, D_D, G_D, INV_D, O_D, TRANSPOSED)
        kh0, kh_step, taps_h, ih0, ih_step, ih_tap, oh0, oh_step, T_H = axis_maps(
            r_h, K_H, S_H, P_H, D_H, G_H, INV_H, O_H, TRANSPOSED)
        kw0, kw_step, taps_w, iw0, iw_step, iw_tap, ow0, ow_step, T_W = axis_maps(
            r_w, K_W, S_W, P_W, D_W, G_W, INV_W, O_W, TRANSPOSED)
        n_cols = C_col_g
    M = tl.cast(N, pid.dtype) * T_D * T_H * T_W

    # The grid's row tiles are laid out for the largest phase: ceil(O / S) rows along
    # each axis (every output for the direct convolution).
    if TRANSPOSED:
        rows_d, rows_h, rows_w = tl.cdiv(O_D, S_D), tl.cdiv(O_H, S_H), tl.cdiv(O_W, S_W)
    else:
        rows_d, rows_h, rows_w = O_D, O_H, O_W
    if TMA_W:  # row tiles (n, t_d, patch of t_h, patch of t_w)
        patches_h = tl.cdiv(rows_h, BLOCK_M // TMA_W)
        patches_w = tl.cdiv(rows_w, TMA_W)
        num_pid_m = N * rows_d * patches_h * patches_w
    elif ONE_GEMM or PHASE_COLUMNS:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    else:
        num_pid_m = tl.cdiv(tl.cast(N, pid.dtype) * rows_d * rows_h * rows_w, BLOCK_M)

    # Grouped ordering of (row tile, column tile) for L2 reuse.
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows

    if TMA_W:
        # pid_m = ((n*rows_d + t_d)*patches_h + patch_h)*patches_w + patch_w; row r of the
        # patch is (t_h0 + r // TMA_W, t_w0 + r % TMA_W).
        t_w0 = (pid_m % patches_w) * TMA_W
        rest = pid_m // patches_w
        t_h0 = (rest % patches_h) * (BLOCK_M // TMA_W)
        rest = rest // patches_h
        t_d0 = rest % rows_d
        n0 = rest // rows_d
        offs_m = tl.arange(0, BLOCK_M)
        t_w = t_w0 + offs_m % TMA_W
        t_h = t_h0 + offs_m // TMA_W
        t_d = t_d0 + offs_m * 0
        n = n0 + offs_m * 0
        mask_m = (t_w < T_W) & (t_h < T_H) & (t_d < T_D)
        tile_live = (t_d0 < T_D) & (t_h0 < T_H) & (t_w0 < T_W)
    else:
        # Rows: m = ((n*T_D + t_d)*T_H + t_h)*T_W + t_w.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n, t_d, t_h, t_w = phase_rows(offs_m, T_D, T_H, T_W)
        tile_live = pid_m * BLOCK_M < M
    # Input position of tap 0 for each row: i0 + t*i_step.
    in_d = id0 + t_d * id_step
    in_h = ih0 + t_h * ih_step
    in_w = iw0 + t_w * iw_step

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    if ONE_GEMM or PHASE_COLUMNS:
        # Column j = ((kd*Q_H + kh)*Q_W + kw)*C_col_g + channel, where (kd, kh, kw) is the
        # column's tap over the kernel (ONE_GEMM) or its phase r over the stride
        # (PHASE_COLUMNS, whose first tap is kk = r): its tap's weight, and the tap's share
        # kk*d of the output position (o = i*s - p + kk*d; u*s - p + r, as d = 1 there).
        Q_H = K_H if ONE_GEMM else S_H
        Q_W = K_W if ONE_GEMM else S_W
        channel = offs_n % C_col_g
        tap_n = offs_n // C_col_g
        col_kw = tap_n % Q_W
        col_kh = (tap_n // Q_W) % Q_H
        col_kd = tap_n // (Q_W * Q_H)
        w_tap_cols = col_kd * swd + col_kh * swh + col_kw * sww
        col_od = col_kd * D_D
        col_oh = col_kh * D_H
        col_ow = col_kw * D_W
    else:
        channel = offs_n
        w_tap_cols = 0

    x_rows = x_ptr + n * sxn + (group * C_red_g) * sxc
    # The group's weight starts at its first input channel, group * C_in_g: a reduced
    # channel when transposed, a produced one in the direct convolution.
    if TRANSPOSED:
        w_group = group * C_red_g * swr
    else:
        w_group = group * C_col_g * swc
    w_cols = w_ptr + w_group + channel * swc + w_tap_cols

    acc_dtype = tl.float64 if OPERAND_DTYPE == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)

    # Reduction over (tap_d, tap_h, tap_w, channel block), flattened into one loop so that
    # it pipelines; a tile past the end of its phase reduces over nothing.  The position
    # (jd, jh, jw, kb) advances like an odometer, channel block fastest: compares and
    # selects on scalars, where decoding it from the iteration number took five runtime
    # divisions per step.
    k_blocks = tl.cdiv(C_red_g, BLOCK_K)
    n_iter = tl.where(tile_live, taps_d * taps_h * taps_w * k_blocks, 0)
    if TMA_W:
        # The group's input channels as a [N, I_D, I_H, I_W, C_red_g] tensor, channels
        # contiguous; a box is one tap's input tile (coordinates outside read as zero).
        x_boxes = tl.make_tensor_descriptor(x_ptr + (group * C_red_g) * sxc, shape=[N, I_D, I_H, I_W, C_red_g],
                                            strides=[sxn, sxd, sxh, sxw, 1],
                                            block_shape=[1, 1, BLOCK_M // TMA_W, TMA_W, BLOCK_K])
    kb = 0
    jw = 0
    jh = 0
    jd = 0
    for _ in range(0, n_iter):
        c = kb * BLOCK_K + offs_k
        # Tap j reads input i0 + t*i_step + j*i_tap_step through kernel index kk0 + j*kk_step.
        mask_k = c < C_red_g
        if TMA_W:  # the patch's input (i_step = 1), from the patch's corner
            a = x_boxes.load([n0, id0 + t_d0 + jd * id_tap, ih0 + t_h0 + jh * ih_tap, iw0 + t_w0 + jw * iw_tap,
                              kb * BLOCK_K])
            a = tl.reshape(a, [BLOCK_M, BLOCK_K])
        else:
            i_d = in_d + jd * id_tap
            i_h = in_h + jh * ih_tap
            i_w = in_w + jw * iw_tap
            row_ok = mask_m & (i_d >= 0) & (i_d < I_D) & (i_h >= 0) & (i_h < I_H) & (i_w >= 0) & (i_w < I_W)
            a = tl.load(
                x_rows[:, None] + (i_d * sxd + i_h * sxh + i_w * sxw)[:, None] + c[None, :] * sxc,
                mask=row_ok[:, None] & mask_k[None, :],
                other=0.0,
            )
        w_tap = (kd0 + jd * kd_step) * swd + (kh0 + jh * kh_step) * swh + (kw0 + jw * kw_step) * sww
        w_mask = mask_n
        if PHASE_COLUMNS:  # the column's phase has tap r + j*s only where it is inside the kernel
            w_mask &= ((col_kd + jd * S_D < K_D) & (col_kh + jh * S_H < K_H) & (col_kw + jw * S_W < K_W))
        b = tl.load(w_cols[None, :] + c[:, None] * swr + w_tap, mask=mask_k[:, None] & w_mask[None, :], other=0.0)
        if BLOCK_N >= 16 and BLOCK_K >= 16:
            acc = tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=acc_dtype)
        else:  # acc[m, n] += sum_c a[m, c] * b[c, n], one FMA per product
            acc += fma_dot(a.to(acc_dtype), b.to(acc_dtype))
        kb, jw, jh, jd = next_step(kb, jw, jh, jd, k_blocks, taps_w, taps_h)

    # Epilogue: y = activation(acc + bias) + residual.
    if HAS_BIAS:
        bias = tl.load(b_ptr + group * C_col_g + channel, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    acc = activations.apply(acc, ACTIVATION, negative_slope)

    # Output position of each row: o0 + t*o_step.
    o_d = od0 + t_d * od_step
    o_h = oh0 + t_h * oh_step
    o_w = ow0 + t_w * ow_step
    cols = (group * C_col_g + channel)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    # The column's tap moves the output by kk*d (its phase by r); what falls outside is dropped.
    if ONE_GEMM or PHASE_COLUMNS:
        mask_out &= _inside(o_d, col_od, O_D) & _inside(o_h, col_oh, O_H) & _inside(o_w, col_ow, O_W)
        y_cols = cols * syc + (col_od * syd + col_oh * syh + col_ow * syw)[None, :]
        r_cols = cols * src + (col_od * srd + col_oh * srh + col_ow * srw)[None, :]
    else:
        y_cols = cols * syc
        r_cols = cols * src
    if HAS_RESIDUAL:
        r_rows = r_ptr + n * srn + o_d * srd + o_h * srh + o_w * srw
        acc += tl.load(r_rows[:, None] + r_cols, mask=mask_out, other=0.0).to(acc_dtype)
    y_rows = y_ptr + n * syn + o_d * syd + o_h * syh + o_w * syw
    tl.store(y_rows[:, None] + y_cols, acc.to(y_ptr.dtype.element_ty), mask=mask_out)


@functools.lru_cache(maxsize=4096)
def plan_launch(out_layout: tuple, x_layout: tuple, weight_layout: tuple, residual_strides: tuple | None,
                has_bias: bool, stride: tuple, padding: tuple, dilation: tuple, groups: int, transposed: bool,
                dtype: torch.dtype, allow_tf32: bool, activation: str, int64_forced: bool,
                tma: bool = False, every_phase_columns: bool = False) -> launcher.LaunchPlan:
    """The launch plan of ``phase_gemm`` for tensors of these layouts (``(shape,
    strides)`` pairs) and this geometry (``layer.layer``): rows per phase, grid, tuning key,
    candidate table and cost-model problem.  ``tma``: the experimental TMA variant may
    be offered (the caller checked the flag, the device and the input's alignment); it
    is where the layout meets the hardware's limits.  ``every_phase_columns``: the
    phases side by side are offered whatever the output channels (experimental)."""
    geometry = layer(out_layout, x_layout, weight_layout, residual_strides, stride, padding, dilation, groups,
                     transposed, dtype, int64_forced)
    n, c_red_g, c_col_g, n_phases = geometry.n, geometry.c_red_g, geometry.c_col_g, geometry.phases
    rows_per_phase, m_max, int64 = geometry.rows_per_phase, geometry.m_max, geometry.int64
    x_shape, x_strides = padded(x_layout, 5 - len(x_layout[0]))
    one_gemm = transposed and all(axis.one_pair_each() for axis in geometry.axis_plans)
    pixels = n * math.prod(x_shape[2:])
    one_gemm_columns = c_col_g * math.prod(geometry.kernel_size) if one_gemm else 0
    # The phases side by side (dilation 1, fewer output channels per group than a
    # tensor-core tile is wide; a layer that is one GEMM already has them so): rows u
    # per axis, the phases' columns and taps.
    phase_columns, u_rows = 0, ()
    if transposed and not one_gemm and (c_col_g < DOT_MIN or every_phase_columns) and all(d == 1 for d in dilation):
        u_rows = tuple((o - 1 + p) // s - p // s + 1 for o, s, p in zip(geometry.out_size, geometry.stride,
                                                                         geometry.padding))
        phase_columns = c_col_g * math.prod(geometry.stride)
        column_taps = math.prod(-(-k // s) for k, s in zip(geometry.kernel_size, geometry.stride))
    precision = input_precision(dtype, allow_tf32)
    # The TMA variant reads boxes of a [N, D, H, W, C] view of the input: channels
    # contiguous, the other strides and each group's first channel 16-byte aligned, and
    # coordinates in 32 bits.
    tma_width = 0
    if tma and transposed and not int64 and x_strides[1] == 1 and all(
            st * dtype.itemsize % 16 == 0 for st in (x_strides[0], *x_strides[2:], c_red_g if groups > 1 else 0)):
        tma_width = min(triton.next_power_of_2(rows_per_phase[2]), 256)

    def grid(meta):
        if meta["ONE_GEMM"]:
            return (-(-pixels // meta["BLOCK_M"]) * -(-one_gemm_columns // meta["BLOCK_N"]), groups)
        if meta["PHASE_COLUMNS"]:
            return (-(-(n * math.prod(u_rows)) // meta["BLOCK_M"]) * -(-phase_columns // meta["BLOCK_N"]), groups)
        if meta["TMA_W"]:  # patches of BLOCK_M / TMA_W × TMA_W rows
            rows_d, rows_h, rows_w = rows_per_phase
            row_tiles = n * rows_d * -(-rows_h // (meta["BLOCK_M"] // meta["TMA_W"])) * -(-rows_w // meta["TMA_W"])
        else:
            row_tiles = -(-m_max // meta["BLOCK_M"])
        return (row_tiles * -(-c_col_g // meta["BLOCK_N"]) * n_phases, groups)

    def problem() -> Problem:
        variants = []
        if one_gemm:
            variants.append(("ONE_GEMM", (Part(groups, pixels, one_gemm_columns, c_red_g, 1),)))
        if phase_columns:
            variants.append(("PHASE_COLUMNS", (Part(groups, n * math.prod(u_rows), phase_columns, c_red_g,
                                                    column_taps),)))
        return Problem(tuple(geometry.parts()), dtype.itemsize,
                       "tf32" if precision == "tf32" else str(dtype).removeprefix("torch."),
                       PHASE_GEMM_DOT_SIDES, tuple(variants))

    return launcher.LaunchPlan(
        scalars=(n, c_red_g, c_col_g, *geometry.scalars),
        constants=dict(
            TRANSPOSED=transposed,
            HAS_BIAS=has_bias,
            ACTIVATION=activation,
            HAS_RESIDUAL=residual_strides is not None,
            INT64_INDEX=int64,
            OPERAND_DTYPE=operand_dtype(dtype),
            INPUT_PRECISION=precision,
        ),
        grid=grid,
        # The shape class a tuning is kept for: the GEMM's N and K (channels per group)
        # and the groups (they multiply the programs), the taps per phase and their
        # spacing (kernel size, stride, dilation), the access pattern (direction, input
        # and output channels-last or not: a channels-last copy of an NCHW input still
        # writes NCHW), the dtype and dot precision, and M bucketed, so that
        # every layer of a model tunes once and image sizes within a factor of two share
        # a tuning; and which variants are offered (a layer of the same shapes with other
        # padding may not take the one GEMM, an input at another alignment not the TMA,
        # a dilated one not the phases side by side).
        key=(*geometry.shape_key, precision, *geometry.layout_key, bucket(m_max), one_gemm, bool(tma_width),
             bool(phase_columns)),
        configs=lambda: configs(c_red_g, c_col_g, one_gemm_columns, tma_width, phase_columns),
        problem=problem,
        variants=VARIANTS,
    )


def phase_gemm(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    transposed: bool,
    allow_tf32: bool,
    activation: str | None = None,
    negative_slope: float = 0.01,
    residual: torch.Tensor | None = None,
) -> Callable | None:
    """Write ``out`` with the transposed (or direct) convolution of ``x`` by ``weight``,
    then, fused into the store, ``activation`` (one of ``activations.ACTIVATIONS``) and ``+ residual``
    (shaped like ``out``, any strides).  ``bias``: ``[C_out]``, contiguous.

    The tensors have 1 to 3 spatial axes (all the same number), any strides: ``x``
    ``[N, C_x, *spatial]``, ``out`` ``[N, C_out, *spatial']``, ``weight``
    ``[C_in, C_out/groups, *kernel_size]`` in conv_transpose's layout for both directions
    (so the direct convolution maps ``C_out`` channels of ``x`` onto ``C_in`` channels of
    ``out``); ``stride``, ``padding`` and ``dilation`` have one entry per spatial axis.
    The caller has checked the arguments and sized ``out`` (output padding included).

    Returns ``repeat(out, x, weight, bias, residual)``, which does the same on new
    tensors of this call's class (the same shapes, strides, dtype and device; the same
    geometry, epilogue and slope) with the launches prepared here (``launcher.
    PreparedLaunch``), or None where they may not be kept (``launcher.launch``).

    Where ``x``'s channels are strided (NCHW) and the GEMM reduces over 16 or more
    channels per group, a layer's first call races this launch on ``x`` against the same
    launch on a channels-last copy of it (``staging``: one more pass over ``x``, after
    which the input tiles are vector loads pipelined through shared memory); the copy is
    not the default (it runs only where it won, or where an ``only`` hook asks for
    ``"staged"``).  The race is timed once per exact shape and remembered as a tuning
    (family ``"input_layout"``).  Likewise, where ``grouped.offered`` a layer of few
    channels per group on channels-last input, the first call races the grouped kernel
    (``"grouped"``, the default there: the groups side by side as a tile's columns)
    against this one (``"gathered"``), remembered as family ``"grouping"``.
    """
    # The plan's arguments but the input's layout, built once: with the input's they key
    # the race too (a key of values already at hand, no more work per call).
    others = ((out.shape, out.stride()), (weight.shape, weight.stride()),
              None if residual is None else residual.stride(), bias is not None,
              tuple(stride), tuple(padding), tuple(dilation), groups, transposed, x.dtype, allow_tf32,
              activation or "", int64_forced())

    def plan(x: torch.Tensor, x_layout: tuple) -> launcher.LaunchPlan:
        out_layout, weight_layout, *geometry = others
        return plan_launch(out_layout, x_layout, weight_layout, *geometry,
                           transposed and experimental("tma") and x.data_ptr() % 16 == 0 and _has_tma(x.device),
                           experimental("phase_columns"))

    def launch(x: torch.Tensor, plan: launcher.LaunchPlan) -> launcher.PreparedLaunch | None:
        return launcher.launch(plan.request(
            "phase_gemm", _phase_gemm_kernel,
            (x, weight, x if bias is None else bias, out, out if residual is None else residual), x.device, out,
            trailing=(negative_slope,)))

    x_layout = (x.shape, x.stride())
    gathered = plan(x, x_layout)
    by_groups = _grouped_plan(x_layout, *others)
    if by_groups is None and not staging.offered(x_layout, x.element_size(), groups):
        return _repeat(launch(x, gathered))
    prepared = {}

    def staged() -> torch.Tensor:
        copy, prepared["copy"] = staging.channels_last(x)
        prepared["staged"] = launch(copy, plan(copy, (copy.shape, copy.stride())))
        return out

    def side_by_side() -> torch.Tensor:
        prepared["grouped"] = grouped.grouped(out, x, weight, bias, residual, by_groups, negative_slope)
        return out

    def as_given() -> torch.Tensor:
        prepared["gathered"] = launch(x, gathered)
        return out

    # (The plan of the input as given is this exact class of calls: it keeps the answer.)
    if by_groups is None:
        runs, family = {"gathered": as_given, "staged": staged}, "input_layout"
    else:
        runs, family = {"grouped": side_by_side, "gathered": as_given}, "grouping"
    winner = launcher.race(x.device, (x_layout, *others), runs, family=family, decided=gathered.raced)
    runs[winner]()
    if winner == "staged":
        return _repeat(prepared["staged"], prepared["copy"], staged=True)
    return _repeat(prepared[winner])


def _repeat(gemm: launcher.PreparedLaunch | None, copy: launcher.PreparedLaunch | None = None,
            staged: bool = False) -> Callable | None:
    """``phase_gemm``'s repeat: the prepared GEMM launch on ``x`` or (``staged``) on a
    channels-last copy of it made by the prepared ``copy`` launch; None where a launch
    it needs was not prepared."""
    if gemm is None or (staged and copy is None):
        return None
    if not staged:
        def repeat(out, x, weight, bias, residual) -> None:
            gemm.launch(x, weight, x if bias is None else bias, out, out if residual is None else residual)
    else:
        def repeat(out, x, weight, bias, residual) -> None:
            x = staging.repeat(copy, x)
            gemm.launch(x, weight, x if bias is None else bias, out, out if residual is None else residual)
    return repeat


def _grouped_plan(x_layout: tuple, out_layout: tuple, weight_layout: tuple, residual_strides: tuple | None,
                  has_bias: bool, stride: tuple, padding: tuple, dilation: tuple, groups: int, transposed: bool,
                  dtype: torch.dtype, allow_tf32: bool, activation: str,
                  int64_forced: bool) -> launcher.LaunchPlan | None:
    """The grouped kernel's launch plan for this call where it is offered
    (``grouped.offered``), else None."""
    shape = layer(out_layout, x_layout, weight_layout, residual_strides, stride, padding, dilation, groups,
                  transposed, dtype, int64_forced)
    if not grouped.offered(shape.c_red_g, shape.c_col_g, groups, x_layout[1][1] == 1):
        return None
    return grouped.plan_launch(out_layout, x_layout, weight_layout, residual_strides, has_bias, stride, padding,
                               dilation, groups, transposed, dtype, activation, int64_forced)


def _has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can read through a tensor memory accelerator: a GPU
    of compute capability 9.0 or later (as the launcher describes it: the tools that
    compile for a GPU on the CPU describe one), or the interpreter, which emulates one."""
    capability = launcher.device_info(device).capability
    if capability is None:
        return INTERPRETING
    if capability < (9, 0):
        return False
    if device.type == "cuda":
        _use_torch_allocator()
    return True


@functools.cache
def _use_torch_allocator() -> None:
    """Tensor descriptors made in a kernel need global scratch memory from an allocator
    set in Triton: PyTorch's caching allocator, on the current CUDA device."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
