"""The weight and bias gradients of a transposed convolution: the Triton kernels and their launcher.

For ``y = conv_transpose(x, w) + b`` (stride s, padding p, dilation d, per axis),

    grad_w[ci, co, kk] = Σ_{n, i} x[n, ci, i] · grad_y[n, co, i*s - p + kk*d]
    grad_b[co]         = Σ_{n, o} grad_y[n, co, o]

Tap ``kk`` of a stride phase meets real input pixels only (the phases of
``phase_gemm``: tap ``kk`` belongs to phase ``(kk*d - p) mod s`` and reads ``grad_y`` at
``o = i*s + t`` with ``t = kk*d - p``), so the weight gradient is one GEMM of
``C_in/groups`` rows by ``taps × C_out/groups`` columns (a column is a (tap, output
channel) pair) reducing over the ``N·D·H·W`` input pixels: only real pixels are read, no
zero is inserted.  A tile of columns holds ``TAPS_N`` taps of ``BLOCK_N / TAPS_N``
channels each, so a layer with few output channels per group still fills a tensor-core
tile, and each input tile serves all of the tile's taps.

The reduction runs over *boxes* of input pixels: ``BLOCK_K = BOX_N·BOX_D·BOX_H·BOX_W``
pixels, a power of two along each axis (sized by the launcher to the image).  A box's
element pattern (which pixel of the box an element of the tile is) is the same at every
step, computed once; the loop advances the box's origin like an odometer (scalar
compares and selects: ``layer.next_step``, the phase GEMM's, with W, H, D and the batch as
its digits), so no step divides anything.  Each tap reaches the inputs
``[lo, hi)`` along an axis (those whose output lands inside ``grad_y``): one range per
column, computed once, against which a step compares its pixels.

The candidate tiles are data, in ``tiles``: a tensor-core table per layout of the
operands (channels-last, or NCHW, whose element-by-element loads take shallower tiles)
and an FMA table, chosen for Hopper (``tiles.WEIGHT_GRAD``), the interpreter's, and the
rule that decides which paths a layer's channels take (``tiles.paths``); ``configs``
sizes the rows to the layer and gives each its ``TAPS_N`` and its box.

The reduction is split into ``split`` contiguous ranges of boxes.  With one range, each
program writes its tile straight into ``grad_w`` (the permute to
``[C_in, C_out/groups, *kernel_size]`` and the cast to the input's dtype are in its
store).  With several, each writes its partial tile, in the same layout and in the
accumulator's dtype, to a workspace.  The bias gradient, when asked for, is computed by
programs of the same launch: each sums ``grad_y`` over a range of output boxes for a
tile of output channels into a workspace of partial sums (every output pixel is summed,
whether or not any (input, tap) pair reaches it).  ``_sum_splits_kernel`` then adds the
weight's partials and the bias's, each in a fixed order, and casts them: no atomics,
bitwise-identical runs.

Grid: (bias programs + row tiles × column tiles, group × split).
"""
import functools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import launcher, staging
from .common import INTERPRETING, allocated, fma_dot, input_precision, int64_forced, operand_dtype, padded, spans_int64
from .cost import Part, Problem
from .layer import next_step
from .tiles import INTERPRETER_WEIGHT_GRAD, WEIGHT_GRAD, WEIGHT_GRAD_DOT_SIDES, paths, sized
from .tuning import bucket, config

# Boxes whose grad_y loads a bias program issues together (its loop is not pipelined:
# several loads in flight are what keep a program near its share of the bandwidth; with
# 4, ptxas gave the NCHW bias programs a stack frame, which the compile report counts
# as spilling).
BIAS_UNROLL = tl.constexpr(2)


def box(block_k: int, spatial: tuple[int, int, int]) -> dict:
    """The box of ``block_k`` pixels a reduction step covers, for an input of ``spatial``
    ``(D, H, W)`` pixels: powers of two filled from W outwards (each no longer than its
    axis rounded up to a power of two), the rest along the batch; as the kernel's
    ``BOX_N, BOX_D, BOX_H, BOX_W``."""
    sides = {}
    left = block_k
    for name, size in zip(("BOX_W", "BOX_H", "BOX_D"), reversed(spatial)):
        sides[name] = min(left, triton.next_power_of_2(max(size, 1)))
        left //= sides[name]
    return dict(BOX_N=left, BOX_D=sides["BOX_D"], BOX_H=sides["BOX_H"], BOX_W=sides["BOX_W"])


def configs(c_in: int, c_out: int, taps: int = 1, spatial: tuple[int, int, int] = (1, 1, 1), gathered: bool = False,
            interpreter: bool = INTERPRETING) -> list[dict]:
    """Launch configurations to choose from for the GEMM of ``c_in`` rows by ``taps ×
    c_out`` columns (channels per group) reducing over pixels of ``spatial`` ``(D, H,
    W)`` images (pruned and ranked by the launcher): the rows of ``tiles.WEIGHT_GRAD``
    for the operands' layout (``gathered``: the channels are not contiguous) on the
    paths that ``tiles.paths`` offers for the two sides, as in ``phase_gemm.configs``:
    tensor-core tiles, then, when either side is below ``tiles.DOT_MIN``, FMA tiles as
    wide as it (only those when both are 1).  Each tile's ``TAPS_N``: as many taps as
    its columns hold once the output channels (rounded up to a power of two) are laid
    side by side; its box: ``box``.  In the interpreter (``interpreter``),
    ``tiles.INTERPRETER_WEIGHT_GRAD``, one small tile per path."""
    channels = triton.next_power_of_2(c_out)
    table = INTERPRETER_WEIGHT_GRAD if interpreter else WEIGHT_GRAD["gathered" if gathered else "contiguous"]
    return [config(bm, bn, bk, num_warps=warps, num_stages=stages, TAPS_N=max(1, bn // channels), **box(bk, spatial))
            for path in paths(c_in, taps * c_out)
            for bm, bn, bk, warps, stages in sized(table[path], m=c_in, n=taps * c_out)]


@triton.jit
def _box_pattern(k, BOX_N: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """Element ``k`` of a box is pixel ``(kn, kd, kh, kw)`` from its origin:
    ``k = ((kn*BOX_D + kd)*BOX_H + kh)*BOX_W + kw`` (powers of two: shifts and masks)."""
    kw = k % BOX_W
    kh = (k // BOX_W) % BOX_H
    kd = (k // (BOX_W * BOX_H)) % BOX_D
    kn = k // (BOX_W * BOX_H * BOX_D)
    return kn, kd, kh, kw


@triton.jit
def _box_range(part, PARTS, N, D, H, W, BOX_N: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr,
               BOX_W: tl.constexpr):
    """Range ``part`` of ``PARTS`` equal ranges of the boxes that tile ``[N, D, H, W]``
    pixels: its first box ``(bn, bd, bh, bw)`` (box coordinates, W fastest), how many
    boxes it holds, and the boxes per axis ``(D, H, W)`` that the odometer wraps at."""
    boxes_d, boxes_h, boxes_w = tl.cdiv(D, BOX_D), tl.cdiv(H, BOX_H), tl.cdiv(W, BOX_W)
    total = tl.cdiv(N, BOX_N) * boxes_d * boxes_h * boxes_w
    per_part = tl.cdiv(total, PARTS)
    first = part * per_part
    count = tl.maximum(tl.minimum(per_part, total - first), 0)
    # first = ((bn*boxes_d + bd)*boxes_h + bh)*boxes_w + bw (divisions once, before the loop)
    bw = first % tl.maximum(boxes_w, 1)
    rest = first // tl.maximum(boxes_w, 1)
    bh = rest % tl.maximum(boxes_h, 1)
    rest = rest // tl.maximum(boxes_h, 1)
    bd = rest % tl.maximum(boxes_d, 1)
    bn = rest // tl.maximum(boxes_d, 1)
    return bn, bd, bh, bw, count, boxes_d, boxes_h, boxes_w


@triton.jit
def _in_box(kn, kd, kh, kw, left_n, left_d, left_h, left_w, BOX_N: tl.constexpr, BOX_D: tl.constexpr,
            BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """Which elements of a box lie inside the tensor, ``left_*`` pixels remaining from
    the box's origin along each axis.  An axis the box spans with one pixel needs no
    check (the odometer keeps the origin inside)."""
    inside = kw >= 0
    if BOX_W > 1:
        inside &= kw < left_w
    if BOX_H > 1:
        inside &= kh < left_h
    if BOX_D > 1:
        inside &= kd < left_d
    if BOX_N > 1:
        inside &= kn < left_n
    return inside


@triton.jit
def _reaches(k, a0, lo, hi, BOX: tl.constexpr):
    """Whether input ``a0 + k`` (``k``: ``[BLOCK_K, 1]``) lies in a tap's range
    ``[lo, hi)`` (scalars, or ``[1, BLOCK_N]`` per column): ``[BLOCK_K, 1]`` or
    ``[BLOCK_K, BLOCK_N]``; one compare of the origin alone where the box spans one pixel."""
    if BOX > 1:
        return (k >= lo - a0) & (k < hi - a0)
    else:
        return tl.where((a0 >= lo) & (a0 < hi), k == k, False)


@triton.jit
def _tap_inputs(t, S, I, O):  # noqa: E741  (jit kernel left untouched; I, O: input/output extents, as in the docstring)
    """The inputs ``i`` in ``[lo, hi)`` of an axis whose output ``o = i*S + t`` lies in
    ``[0, O)``: ``lo = ceil(-t/S)`` (at least 0), ``hi = floor((O-1-t)/S) + 1`` (at most
    ``I``; 0 when ``t > O-1``).  Where a numerator is negative the result is clamped, so
    Triton's truncating ``//`` gives the floor where it is used."""
    lo = tl.maximum((S - 1 - t) // S, 0)
    hi = tl.where(t <= O - 1, (O - 1 - t) // S + 1, 0)
    return lo, tl.minimum(hi, I)


@triton.jit
def _gemm_tile(
    x_ptr, gy_ptr, out_ptr, pid, group, split, groups,
    N, C_in_g, C_out_g, I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W, SPLIT,
    OPERAND_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAPS_N: tl.constexpr,
    BOX_N: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    CHANNELS_LAST_GRAD: tl.constexpr,
):
    """Tile ``pid`` of (input channel) rows by (tap, output channel) columns of ``group``,
    over pixel range ``split``; the arguments as in ``_weight_grad_kernel``."""
    CO_N = BLOCK_N // TAPS_N
    taps = K_D * K_H * K_W
    tiles_c = tl.cdiv(C_out_g, CO_N)
    tiles_n = tl.cdiv(taps, TAPS_N) * tiles_c
    pid_m = pid // tiles_n
    pid_t = (pid % tiles_n) // tiles_c
    pid_c = pid % tiles_c

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    # Column j of the tile is (tap, output channel) = (pid_t*TAPS_N + j // CO_N, pid_c*CO_N + j % CO_N);
    # with one tap per tile the tap is one scalar for the tile, and so is everything
    # derived from it below (its shift of the output, its input ranges).
    if TAPS_N == 1:
        co = (pid_c * CO_N + offs_j)[None, :]
        tap = pid_t
    else:
        co = (pid_c * CO_N + offs_j % CO_N)[None, :]
        tap = pid_t * TAPS_N + (offs_j // CO_N)[None, :]
    mask_m = offs_m < C_in_g
    mask_n = tl.where(tap < taps, co < C_out_g, False)
    # Tap (kd, kh, kw) reads grad_y at o = i*s + t with t = kk*d - p, per axis, from the
    # inputs [lo, hi) whose o lies inside grad_y.
    t_w = (tap % K_W) * D_W - P_W
    t_h = ((tap // K_W) % K_H) * D_H - P_H
    t_d = (tap // (K_W * K_H)) * D_D - P_D
    lo_w, hi_w = _tap_inputs(t_w, S_W, I_W, O_W)
    lo_h, hi_h = _tap_inputs(t_h, S_H, I_H, O_H)
    lo_d, hi_d = _tap_inputs(t_d, S_D, I_D, O_D)
    x_rows = x_ptr + ((group * C_in_g + offs_m) * sxc)[:, None]
    gy_cols = gy_ptr + (group * C_out_g + co) * syc + t_d * syd + t_h * syh + t_w * syw

    # Element k of a box is pixel (kn, kd, kh, kw) from the box's origin: its offset in x,
    # and in grad_y the offset of its output o = i*s (the tap's t is in gy_cols).
    kn, kd, kh, kw = _box_pattern(tl.arange(0, BLOCK_K).to(offs_m.dtype), BOX_N, BOX_D, BOX_H, BOX_W)
    x_box = (kn * sxn + kd * sxd + kh * sxh + kw * sxw)[None, :]
    gy_box = (kn * syn + kd * S_D * syd + kh * S_H * syh + kw * S_W * syw)[:, None]
    kn_b, kd_b, kh_b, kw_b = kn[:, None], kd[:, None], kh[:, None], kw[:, None]

    acc_dtype = tl.float64 if OPERAND_DTYPE == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    bn, bd, bh, bw, n_iter, boxes_d, boxes_h, boxes_w = _box_range(split, SPLIT, N, I_D, I_H, I_W,
                                                                   BOX_N, BOX_D, BOX_H, BOX_W)
    for _ in range(0, n_iter):
        # The box's origin (n0, d0, h0, w0) = (bn, bd, bh, bw) * BOX.
        n0, d0, h0, w0 = bn * BOX_N, bd * BOX_D, bh * BOX_H, bw * BOX_W
        inside = _in_box(kn, kd, kh, kw, N - n0, I_D - d0, I_H - h0, I_W - w0, BOX_N, BOX_D, BOX_H, BOX_W)
        a = tl.load(x_rows + (n0 * sxn + d0 * sxd + h0 * sxh + w0 * sxw) + x_box,
                    mask=mask_m[:, None] & inside[None, :], other=0.0)
        # Pixel i reaches grad_y through the column's tap where i lies in the tap's [lo, hi) on every axis.
        hits = (_reaches(kw_b, w0, lo_w, hi_w, BOX_W) & _reaches(kh_b, h0, lo_h, hi_h, BOX_H)
                & _reaches(kd_b, d0, lo_d, hi_d, BOX_D))
        if BOX_N > 1:
            hits &= kn_b < N - n0
        b = tl.load(gy_cols + (n0 * syn + d0 * S_D * syd + h0 * S_H * syh + w0 * S_W * syw) + gy_box,
                    mask=hits & mask_n, other=0.0)
        if BLOCK_M >= 16 and BLOCK_N >= 16:
            acc = tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=acc_dtype)
        else:  # acc[ci, col] += sum_k a[ci, k] * b[k, col], one FMA per product
            acc += fma_dot(a.to(acc_dtype), b.to(acc_dtype))
        bw, bh, bd, bn = next_step(bw, bh, bd, bn, boxes_w, boxes_h, boxes_d)

    # grad_w[split][group*C_in_g + ci, co, tap]: the permute, the weight's layout (taps
    # then channels, or channels-last: channels then taps) and (with one range) the
    # cast, in the store; a range's rows follow the previous range's.
    rows = split * (groups * C_in_g) + group * C_in_g + offs_m
    if CHANNELS_LAST_GRAD:
        out = out_ptr + (rows[:, None] * taps + tap) * C_out_g + co
    else:
        out = out_ptr + (rows[:, None] * C_out_g + co) * taps + tap
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n)


@triton.jit
def _bias_partial(
    gy_ptr, bias_ptr, pid, group, split, groups,
    N, C_out_g, O_D, O_H, O_W, syn, syc, syd, syh, syw, SPLIT, BIAS_PARTS,
    ACC_DTYPE: tl.constexpr, CO_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
    BOX_N: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
):
    """Bias program ``pid`` of ``group`` and pixel range ``split``: the sum of
    ``grad_y`` over one range of output boxes (range ``split*BIAS_PARTS + part`` of
    ``SPLIT*BIAS_PARTS``) for ``CO_N`` output channels; the arguments as in
    ``_weight_grad_kernel``."""
    tiles_c = tl.cdiv(C_out_g, CO_N)
    pid_c = pid % tiles_c
    part = split * BIAS_PARTS + pid // tiles_c
    co = pid_c * CO_N + tl.arange(0, CO_N)
    mask_c = co < C_out_g
    gy_cols = gy_ptr + ((group * C_out_g + co) * syc)[None, :]
    kn, kd, kh, kw = _box_pattern(tl.arange(0, BLOCK_K).to(co.dtype), BOX_N, BOX_D, BOX_H, BOX_W)
    gy_box = (kn * syn + kd * syd + kh * syh + kw * syw)[:, None]
    # Each element of the box keeps its own running sum (an addition per element per step,
    # in a fixed order); the box's elements are added once, at the end.
    total = tl.zeros((BLOCK_K, CO_N), dtype=ACC_DTYPE)
    bn, bd, bh, bw, count, boxes_d, boxes_h, boxes_w = _box_range(part, SPLIT * BIAS_PARTS, N, O_D, O_H, O_W,
                                                                  BOX_N, BOX_D, BOX_H, BOX_W)
    # UNROLL boxes a step, their loads issued together; `left`: the range's boxes not yet summed.
    left = count
    for _ in range(0, tl.cdiv(count, UNROLL)):
        for _u in tl.static_range(UNROLL):
            n0, d0, h0, w0 = bn * BOX_N, bd * BOX_D, bh * BOX_H, bw * BOX_W
            inside = _in_box(kn, kd, kh, kw, N - n0, O_D - d0, O_H - h0, O_W - w0, BOX_N, BOX_D, BOX_H, BOX_W)
            inside = tl.where(left > 0, inside, False)
            total += tl.load(gy_cols + (n0 * syn + d0 * syd + h0 * syh + w0 * syw) + gy_box,
                             mask=inside[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
            bw, bh, bd, bn = next_step(bw, bh, bd, bn, boxes_w, boxes_h, boxes_d)
            left -= 1
    tl.store(bias_ptr + part * (groups * C_out_g) + group * C_out_g + co, tl.sum(total, axis=0), mask=mask_c)


@triton.jit
def _weight_grad_kernel(
    x_ptr, gy_ptr, out_ptr, bias_ptr,
    N, C_in_g, C_out_g,
    I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W,
    SPLIT, BIAS_PARTS,
    HAS_BIAS: tl.constexpr,
    CHANNELS_LAST_GRAD: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAPS_N: tl.constexpr,
    BOX_N: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
):
    """One tile of (input channel) rows by (tap, output channel) columns of one group over
    one pixel range, or (the first programs of each group and range, with ``HAS_BIAS``)
    one bias program.

    x_ptr:    input ``[N, C_in, I_D, I_H, I_W]``, strides ``(sxn, sxc, sxd, sxh, sxw)``.
    gy_ptr:   output gradient ``[N, C_out, O_D, O_H, O_W]``, strides ``(syn, ..., syw)``.
    out_ptr:  ``[SPLIT, C_in, C_out_g, K_D*K_H*K_W]``: with ``SPLIT == 1`` ``grad_w``
              itself in the input's dtype, contiguous or (``CHANNELS_LAST_GRAD``) with its
              output channels innermost, the taps next; otherwise the contiguous
              workspace of partial sums in the accumulator's dtype; a GEMM program writes
              its tile there.
    bias_ptr: (used only with ``HAS_BIAS``) ``[SPLIT*BIAS_PARTS, C_out]``, contiguous,
              in the accumulator's dtype: the bias gradient's partial sums, one row per
              range of output boxes, each written by the bias programs of that range.
    N, C_in_g, C_out_g: batch, input and output channels per group.
    I_*, O_*: input and output spatial sizes.
    s*:       strides of the input and the output gradient, in elements.
    K_*, S_*, P_*, D_*: kernel size, stride, padding, dilation per axis.
    SPLIT:    number of ranges the pixel reduction is split into (the grid's second axis
              is group × range).
    BIAS_PARTS: bias ranges per pixel range (the bias programs of each group and range).
    HAS_BIAS: also compute the bias gradient's partial sums.
    CHANNELS_LAST_GRAD: ``grad_w`` (with one range) laid out as a channels-last weight
              (a compile-time constant: an epilogue's choice costs no register).
    INT64_INDEX: index in 64 bits (some offset reaches 2**31); 32 bits otherwise.
    OPERAND_DTYPE, INPUT_PRECISION: as in ``phase_gemm``.
    BLOCK_M, BLOCK_N, BLOCK_K: tile of input channels, (tap, output channel) columns,
              pixels; tiles of at least 16 a side multiply on tensor cores, smaller ones
              by FMA.
    TAPS_N:   taps per column tile (a power of two); each holds ``BLOCK_N // TAPS_N``
              output channels (and so does a bias program).
    BOX_N, BOX_D, BOX_H, BOX_W: the box of pixels a step covers (powers of two whose
              product is ``BLOCK_K``).
    """
    pid = tl.program_id(0)
    group = tl.program_id(1) // SPLIT
    split = tl.program_id(1) % SPLIT
    groups = tl.num_programs(1) // SPLIT
    if INT64_INDEX:  # every index below derives from these, so all of it becomes 64-bit
        pid = pid.to(tl.int64)
        group = group.to(tl.int64)
        split = split.to(tl.int64)
    acc_dtype = tl.float64 if OPERAND_DTYPE == tl.float64 else tl.float32
    if HAS_BIAS:  # the first programs of each group and range are the bias's
        bias_programs = tl.cdiv(C_out_g, BLOCK_N // TAPS_N) * BIAS_PARTS
        if pid < bias_programs:
            _bias_partial(gy_ptr, bias_ptr, pid, group, split, groups,
                          N, C_out_g, O_D, O_H, O_W, syn, syc, syd, syh, syw, SPLIT, BIAS_PARTS,
                          acc_dtype, BLOCK_N // TAPS_N, BLOCK_K, BIAS_UNROLL, BOX_N, BOX_D, BOX_H, BOX_W)
        else:
            _gemm_tile(x_ptr, gy_ptr, out_ptr, pid - bias_programs, group, split, groups,
                       N, C_in_g, C_out_g, I_D, I_H, I_W, O_D, O_H, O_W,
                       sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                       K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W, SPLIT,
                       OPERAND_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TAPS_N, BOX_N, BOX_D, BOX_H, BOX_W,
                       CHANNELS_LAST_GRAD)
    else:
        _gemm_tile(x_ptr, gy_ptr, out_ptr, pid, group, split, groups,
                   N, C_in_g, C_out_g, I_D, I_H, I_W, O_D, O_H, O_W,
                   sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                   K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W, SPLIT,
                   OPERAND_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TAPS_N, BOX_N, BOX_D, BOX_H, BOX_W,
                   CHANNELS_LAST_GRAD)


@triton.jit
def _sum_partials(ws_ptr, out_ptr, pid, SIZE, SPLIT, C_OUT_G, TAPS, soi, soo, sot, BLOCK: tl.constexpr):
    """``out[i] = ws[0, i] + ws[1, i] + ... + ws[SPLIT-1, i]`` for the ``BLOCK`` elements
    of program ``pid``, added in that order and cast to ``out``'s dtype; element
    ``i = (ci*C_OUT_G + co)*TAPS + tap`` of a partial goes to ``ci*soi + co*soo +
    tap*sot`` of ``out``."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    partial = ws_ptr + offs
    total = tl.load(partial, mask=mask)
    for _ in range(1, SPLIT):
        partial += SIZE  # (pointer arithmetic: 64 bits, however large SPLIT * SIZE)
        total += tl.load(partial, mask=mask)
    tap = offs % TAPS
    co = (offs // TAPS) % C_OUT_G
    ci = offs // (TAPS * C_OUT_G)
    tl.store(out_ptr + ci * soi + co * soo + tap * sot, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, bias_ws_ptr, bias_ptr, SIZE, SPLIT, BIAS_SIZE, BIAS_SPLIT,
                       C_OUT_G, TAPS, soi, soo, sot, BLOCK: tl.constexpr):
    """The weight gradient's partial sums added (the first ``cdiv(SIZE, BLOCK)``
    programs), then the bias gradient's (the rest), each in a fixed order.

    ws_ptr:      the weight's partial sums ``[SPLIT, SIZE]``, contiguous.
    out_ptr:     ``grad_w``, ``[C_in, C_OUT_G, TAPS]`` with strides ``(soi, soo, sot)``
                 (the weight's layout, its taps ``sot`` apart in order).
    bias_ws_ptr: the bias's partial sums ``[BIAS_SPLIT, BIAS_SIZE]``, contiguous.
    bias_ptr:    ``grad_b``, ``[BIAS_SIZE]``, contiguous.
    SIZE, SPLIT: elements per weight partial (0: the weight needs no sum), partials.
    BIAS_SIZE, BIAS_SPLIT: the same for the bias (0: no bias gradient).
    C_OUT_G, TAPS: output channels per group and taps of ``grad_w``.
    soi, soo, sot: ``grad_w``'s strides.
    BLOCK:       elements per program.
    """
    pid = tl.program_id(0)
    weight_programs = tl.cdiv(SIZE, BLOCK)
    if pid < weight_programs:
        _sum_partials(ws_ptr, out_ptr, pid, SIZE, SPLIT, C_OUT_G, TAPS, soi, soo, sot, BLOCK)
    else:
        _sum_partials(bias_ws_ptr, bias_ptr, pid - weight_programs, BIAS_SIZE, BIAS_SPLIT, 1, 1, 1, 0, 0, BLOCK)


# The pixel reduction's split, chosen by a model of an H100 (as the cost model's): the
# GEMM's 128x128 tiles run in waves over SMS SMs at about MACS_PER_CYCLE multiply-adds
# per SM per clock (half the bf16 peak, what the forward reaches on small layers), and
# each range beyond the first adds a weight-sized fp32 partial, written and read back,
# at WORKSPACE_BYTES_PER_CYCLE (3.5 TB/s at 1.83 GHz).  No range is shorter than
# MIN_PIXELS (16 steps of a 64-pixel box: a pipeline's fill and drain stay small).
SMS = 132
MACS_PER_CYCLE = 1024
WORKSPACE_BYTES_PER_CYCLE = 1900
MIN_PIXELS = 1024


def split_cycles(split: int, pixels: int, programs: int) -> float:
    """Modelled cycles of the weight gradient of ``programs`` 64×64 tiles over ``pixels``
    cut into ``split`` ranges: its 128×128 tiles' waves, plus the workspace's traffic."""
    tiles = max(1, -(-programs // 4))
    waves = -(-tiles * split // SMS)
    gemm = waves * -(-pixels // split) * 128 * 128 / MACS_PER_CYCLE
    workspace = split * programs * 64 * 64 * 8 / WORKSPACE_BYTES_PER_CYCLE if split > 1 else 0.0
    return gemm + workspace


def default_split(pixels: int, programs: int) -> int:
    """Ranges to split ``pixels`` into, for a GEMM of ``programs`` 64×64 tiles: the one
    ``split_cycles`` finds fastest (1 in the interpreter, where more programs only cost
    time)."""
    if INTERPRETING:
        return 1
    return min(range(1, max(1, pixels // MIN_PIXELS) + 1), key=lambda split: split_cycles(split, pixels, programs))


# The bias programs: about BIAS_BYTES of grad_y each (enough steps to amortise a
# program, few enough that the launch's first wave takes them all beside the GEMM's).
BIAS_BYTES = 1 << 20
SUM_BLOCK = 1024  # elements per program of the split sum (a memory-bound pass over a few MB)


def bias_parts(gy_bytes: int, split: int) -> int:
    """Bias ranges per pixel range of the weight (1 in the interpreter)."""
    if INTERPRETING:
        return 1
    return max(1, -(-gy_bytes // (BIAS_BYTES * split)))


@functools.lru_cache(maxsize=4096)
def plan_launch(x_layout: tuple, grad_y_layout: tuple, kernel_size: tuple, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, dtype: torch.dtype, allow_tf32: bool, split: int | None,
                int64_forced: bool, bias: bool = False,
                out_strides: tuple | None = None) -> tuple[launcher.LaunchPlan, launcher.LaunchPlan | None, int, int]:
    """The launch plans of ``weight_grad`` for tensors of these layouts (``(shape,
    strides)`` pairs) and this geometry: the GEMM's, the split sum's (``None`` with one
    pixel range and no bias), the number of pixel ranges, and the number of bias ranges
    (0 without ``bias``).  ``out_strides``: ``grad_w``'s strides ``(ci, co, tap)``,
    contiguous (the default) or channels-last (``tap_strides``).  Tensors of 1 or 2
    spatial axes run on the kernel's three, the missing leading ones of size 1."""
    lead = 3 - len(kernel_size)
    (x_shape, x_strides), (gy_shape, gy_strides) = (padded(layout, lead) for layout in (x_layout, grad_y_layout))
    kernel_size, stride = (1,) * lead + kernel_size, (1,) * lead + stride
    padding, dilation = (0,) * lead + padding, (1,) * lead + dilation
    n, c_in = x_shape[:2]
    c_out = gy_shape[1]
    c_in_g, c_out_g = c_in // groups, c_out // groups
    taps = math.prod(kernel_size)
    spatial = x_shape[2:]
    pixels = n * math.prod(spatial)
    if split is None:
        split = default_split(pixels, groups * -(-c_in_g // 64) * -(-(taps * c_out_g) // 64))
    parts = bias_parts(math.prod(gy_shape) * dtype.itemsize, split) if bias else 0
    precision = input_precision(dtype, allow_tf32)
    x_channels_last = x_strides[1] == 1 and c_in > 1
    gy_channels_last = gy_strides[1] == 1 and c_out > 1

    def grid(meta):
        channels = meta["BLOCK_N"] // meta["TAPS_N"]
        columns = -(-taps // meta["TAPS_N"]) * -(-c_out_g // channels)
        return -(-c_out_g // channels) * parts + -(-c_in_g // meta["BLOCK_M"]) * columns, groups * split

    def problem() -> Problem:
        """One GEMM per (group, pixel range): every tap's columns side by side (a column
        tile's taps need not share a stride phase: each reads its own shifted window of
        grad_y, the input tile serves them all)."""
        name = "tf32" if precision == "tf32" else str(dtype).removeprefix("torch.")
        return Problem((Part(groups * split, c_in_g, taps * c_out_g, -(-pixels // split), 1),), dtype.itemsize, name,
                       WEIGHT_GRAD_DOT_SIDES)

    contiguous = (c_out_g * taps, taps, 1)
    out_strides = out_strides or contiguous
    int64 = (int64_forced or spans_int64(x_shape, x_strides) or spans_int64(gy_shape, gy_strides)
             or spans_int64((split * c_in * c_out_g * taps,), (1,)) or spans_int64((split * parts * c_out,), (1,))
             or spans_int64((c_in, c_out_g, taps), out_strides))
    gemm = launcher.LaunchPlan(
        scalars=(
            n, c_in_g, c_out_g,
            *x_shape[2:], *gy_shape[2:],
            *x_strides, *gy_strides,
            *kernel_size, *stride, *padding, *dilation,
            split, max(parts, 1),
        ),
        constants=dict(HAS_BIAS=bias, CHANNELS_LAST_GRAD=split == 1 and out_strides != contiguous, INT64_INDEX=int64,
                       OPERAND_DTYPE=operand_dtype(dtype), INPUT_PRECISION=precision),
        grid=grid,
        # The shape class a tuning is kept for, every value that changes which tile is fastest:
        # - c_in_g, c_out_g, groups: the GEMM's M and N per group and how many GEMMs;
        # - kernel size: the taps (N is taps × c_out_g; TAPS_N follows from c_out_g);
        # - stride, padding, dilation: which pixels each tap reaches (the masked share
        #   of a step) and how far apart a tap's grad_y rows lie (stride: the gather);
        # - dtype, precision: the MMA's rate and the operand tiles' bytes;
        # - each tensor's layout: whether its operand tile is a vector load or a gather;
        # - the pixels per range (bucketed): the GEMM's K, and the split with it;
        # - each spatial axis (bucketed): the box a step covers, and its padding waste;
        # - the bias: its programs share the launch;
        # - the index width: 64-bit address arithmetic costs registers.
        key=(c_in_g, c_out_g, groups, *kernel_size, *stride, *padding, *dilation, str(dtype), precision,
             x_channels_last, gy_channels_last, bucket(-(-pixels // split)), *(bucket(s) for s in spatial), bias,
             int64),
        configs=lambda: configs(c_in_g, c_out_g, taps, spatial, gathered=not (x_channels_last and gy_channels_last)),
        problem=problem,
    )
    if split == 1 and not bias:
        return gemm, None, split, parts
    size = c_in * c_out_g * taps if split > 1 else 0
    total = launcher.LaunchPlan(
        scalars=(size, split, c_out if bias else 0, split * parts, c_out_g, taps, *out_strides), constants={},
        grid=lambda meta: (-(-size // meta["BLOCK"]) + (-(-c_out // meta["BLOCK"]) if bias else 0),),
        key=(str(dtype),),  # one configuration: nothing to tune
        configs=lambda: [dict(BLOCK=SUM_BLOCK, num_warps=4, num_stages=1)], problem=lambda: None)
    return gemm, total, split, parts


def tap_strides(shape: tuple, strides: tuple) -> tuple | None:
    """``(ci, co, tap)``: the strides of a weight ``[C_in, C_out/groups, *kernel_size]``
    laid out contiguous or channels-last (its output channels innermost, then its taps in
    order), the layouts the kernels write a gradient in; None for any other (its gradient
    is then made contiguous)."""
    c_out_g, taps = shape[1], math.prod(shape[2:])
    for layout in ((c_out_g * taps, taps, 1), (c_out_g * taps, 1, c_out_g)):
        expected = (*layout[:2], *(layout[2] * math.prod(shape[3 + i:]) for i in range(len(shape) - 2)))
        if all(size == 1 or a == b for size, a, b in zip(shape, strides, expected)):
            return layout
    return None


def weight_grad(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    allow_tf32: bool,
    split: int | None = None,
    bias: bool = False,
    layout: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Callable | None]:
    """``(grad_w, grad_b, repeat)`` of a transposed convolution of ``x`` ``[N, C_in,
    *spatial]`` that produced ``grad_y`` ``[N, C_out, *spatial']`` (1 to 3 spatial axes,
    any strides, the same dtype; the geometry has one entry per axis).

    ``grad_w``: ``[C_in, C_out/groups, *kernel_size]`` in ``x``'s dtype, contiguous, or
    with ``layout`` (a weight's strides) laid out as that weight (where its taps lie one
    stride apart: ``tap_strides``), so that a parameter of that layout takes it as its
    ``.grad`` without a copy.  ``grad_b``: with ``bias``, ``[C_out]`` in ``grad_y``'s
    dtype, the sum of ``grad_y`` over the batch and every output pixel, computed in the
    same launch; otherwise ``None``.  ``split`` overrides the number of pixel ranges
    (default: ``default_split``).  ``repeat(x, grad_y) -> (grad_w, grad_b)``: the same on
    new tensors of this call's class with the launches prepared here, or None where they
    may not be kept (``launcher.launch``).

    One launch when the reduction is one range and no bias is asked for; otherwise two
    (the GEMM, which writes fp32 (fp64) partial sums to a workspace, then the split sum,
    which adds them in a fixed order).  Where an operand's channels are strided and a
    channels-last copy of it is on offer (``staging.offered``) for each such operand, a
    class's first call races the GEMM on the operands as given (``"gathered"``, the
    default: the gather table's tiles) against the GEMM on channels-last copies of the
    strided ones (``"staged"``: one more pass over each, then the channels-last tiles),
    remembered as family ``"operand_layout"``."""
    shape = (x.shape[1], grad_y.shape[1] // groups, *kernel_size)
    out_strides = tap_strides(shape, layout) if layout is not None else None
    strides = (*out_strides[:2], *(out_strides[2] * math.prod(kernel_size[i + 1:]) for i in range(len(kernel_size)))
               ) if out_strides is not None else None
    arguments = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups, x.dtype, allow_tf32,
                 split, int64_forced(), bias, out_strides)
    layouts = ((x.shape, x.stride()), (grad_y.shape, grad_y.stride()))
    gemm, total, split, parts = plan_launch(*layouts, *arguments)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    outputs = _outputs(x, grad_y, shape, strides, split, parts, bias, acc_dtype)
    copied = _copied(layouts, x.element_size(), groups)
    prepared = {}

    def as_given() -> torch.Tensor:
        prepared["gemm"], prepared["total"] = _launch(gemm, total, x, grad_y, *outputs)
        return outputs[0]

    def staged() -> torch.Tensor:
        operands = []
        for name, tensor, copy in (("x", x, copied[0]), ("grad_y", grad_y, copied[1])):
            if copy:
                tensor, prepared[name] = staging.channels_last(tensor)
            operands.append(tensor)
        plans = plan_launch(*((t.shape, t.stride()) for t in operands), *arguments)
        prepared["gemm"], prepared["total"] = _launch(*plans[:2], *operands, *outputs)
        return outputs[0]

    runs = {"gathered": as_given}
    if any(copied):
        runs["staged"] = staged
    winner = "gathered" if len(runs) == 1 else launcher.race(x.device, (*layouts, *arguments), runs,
                                                              family="operand_layout")
    prepared.clear()  # (the race may have run the other way last)
    runs[winner]()
    copies = {name: prepared[name] for name in ("x", "grad_y") if name in prepared}
    keep = (prepared["gemm"] is not None and (total is None or prepared["total"] is not None)
            and all(copy is not None for copy in copies.values()))
    prepared_gemm, prepared_total = prepared["gemm"], prepared["total"]

    def repeat(x: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad, grad_b, partials, bias_partials = _outputs(x, grad_y, shape, strides, split, parts, bias, acc_dtype)
        if "x" in copies:
            x = staging.repeat(copies["x"], x)
        if "grad_y" in copies:
            grad_y = staging.repeat(copies["grad_y"], grad_y)
        prepared_gemm.launch(x, grad_y, partials, partials if bias_partials is None else bias_partials)
        if prepared_total is not None:
            prepared_total.launch(partials, grad, partials if bias_partials is None else bias_partials,
                                  grad if grad_b is None else grad_b)
        return grad, grad_b

    return outputs[0], outputs[1], repeat if keep else None


def _copied(layouts: tuple, itemsize: int, groups: int) -> tuple[bool, bool]:
    """Which of the weight gradient's operands (``x``, ``grad_y``: ``(shape, strides)``
    each) the GEMM would read from a channels-last copy: those whose channels are strided,
    where a copy is on offer for every such operand (after the copies, both operands are
    channels-last and the GEMM takes its channels-last tiles); none otherwise."""
    strided = [strides[1] != 1 and shape[1] > 1 for shape, strides in layouts]
    if not any(strided) or not all(staging.offered(layout, itemsize, groups)
                                   for layout, s in zip(layouts, strided) if s):
        return False, False
    return strided[0], strided[1]


def _outputs(x, grad_y, shape, strides, split, parts, bias, acc_dtype) -> tuple:
    """``weight_grad``'s tensors: ``grad_w`` (``strides``, or contiguous), ``grad_b``
    (or None), and the workspaces of partial sums (``grad_w`` itself with one range;
    None without the bias)."""
    grad = allocated(x.new_empty(shape) if strides is None else x.new_empty_strided(shape, strides))
    partials = grad if split == 1 else allocated(torch.empty((split, *shape), dtype=acc_dtype, device=x.device))
    grad_b = bias_partials = None
    if bias:
        grad_b = allocated(torch.empty(grad_y.shape[1], dtype=grad_y.dtype, device=x.device))
        bias_partials = allocated(torch.empty((split * parts, grad_y.shape[1]), dtype=acc_dtype, device=x.device))
    return grad, grad_b, partials, bias_partials


def _launch(gemm, total, x, grad_y, grad, grad_b, partials, bias_partials) -> tuple:
    """The first launches of ``weight_grad``: the GEMM's and the split sum's prepared
    launches (None where not kept; the split sum's None also where there is none)."""
    prepared_gemm = launcher.launch(gemm.request(
        "weight_grad", _weight_grad_kernel, (x, grad_y, partials, partials if bias_partials is None else bias_partials),
        x.device, partials))
    prepared_total = None
    if total is not None:
        prepared_total = launcher.launch(total.request(
            "split_sum", _sum_splits_kernel,
            (partials, grad, partials if bias_partials is None else bias_partials, grad if grad_b is None else grad_b),
            x.device, grad))
    return prepared_gemm, prepared_total
