"""The weight gradient of a transposed convolution: the Triton kernels and their launcher.

For ``y = conv_transpose(x, w)`` (stride s, padding p, dilation d, per axis),

    grad_w[ci, co, kk] = Σ_{n, i} x[n, ci, i] · grad_y[n, co, i*s - p + kk*d]

which is one GEMM of ``C_in/groups`` rows by ``taps × C_out/groups`` columns (a column is
a (tap, output channel) pair) reducing over all ``N·D·H·W`` input pixels: only real
pixels are read, no zero is inserted.  A tile of columns holds ``TAPS_N`` taps of
``BLOCK_N / TAPS_N`` channels each, so a layer with few output channels per group still
fills a tensor-core tile, and each input tile it loads serves all of the tile's taps:
the input is read once per column tile, ``ceil(taps / TAPS_N)`` times per channel tile
instead of once per tap (``taps`` times).

The reduction is long, so it is split into ``split`` contiguous ranges of pixels.  With
one range, each program writes its tile straight into ``grad_w`` (the permute to
``[C_in, C_out/groups, *kernel_size]`` and the cast to the input's dtype are in its
store).  With several, each writes its partial tile, in the same layout and in the
accumulator's dtype, to a workspace, and ``_sum_splits_kernel`` adds the partials in a
fixed order and casts them: no atomics, bitwise-identical runs.

Grid: (row tiles × column tiles, group × split).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import launcher
from .common import INTERPRETING, allocated, fma_dot, input_precision, int64_forced, operand_dtype, padded, spans_int64
from .cost import Part, Problem
from .tuning import FMA_PRODUCTS, bucket, config


# Tensor-core tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), deep in the pixel
# reduction.  Where the channels are contiguous (channels-last), loads are vectors and
# the widest tiles pay.  Where they are not (NCHW), every element of the A and B tiles
# is loaded on its own with its own 64-bit address (three registers per element in
# flight), beside the fp32 accumulator: the sm_90 compile reports show such tiles at 255
# registers and spilling once accumulator + 3 × gathered elements per thread pass about
# 200 (128×64×32 on 4 warps: 64 + 3·48), so the gathered table keeps that sum <= 160.
DOT_TILES = {
    "contiguous": ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                   (128, 128, 32, 8, 4), (64, 64, 128, 4, 3), (32, 32, 128, 4, 3), (16, 16, 256, 4, 3)),
    "gathered": ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3),
                 (64, 64, 32, 4, 3), (32, 32, 64, 4, 3), (16, 16, 128, 4, 3)),
}


def configs(c_in: int, c_out: int, taps: int = 1, gathered: bool = False, interpreter: bool = INTERPRETING) -> list[dict]:
    """Launch configurations to choose from for the GEMM of ``c_in`` rows by ``taps ×
    c_out`` columns (channels per group) reducing over pixels (pruned and ranked by the
    launcher).  Tensor-core tiles from ``DOT_TILES`` (``gathered``: the channels are not
    contiguous); when either side of the GEMM is below 16 (``tl.dot``'s minimum), also
    FMA tiles as wide as it (only those when both are 1), as in ``phase_gemm.configs``.
    Each tile's ``TAPS_N``: as many taps as its columns hold once the output channels
    (rounded up to a power of two) are laid side by side.  In the interpreter
    (``interpreter``), one small tile per path."""
    channels = triton.next_power_of_2(c_out)
    m_fma, n_fma = min(triton.next_power_of_2(c_in), 16), min(triton.next_power_of_2(taps * c_out), 16)

    def tile(bm: int, bn: int, bk: int, warps: int = 4, stages: int = 3) -> dict:
        return config(bm, bn, bk, num_warps=warps, num_stages=stages, TAPS_N=max(1, bn // channels))

    if interpreter:
        fma = [tile(m_fma, n_fma, 32)]
        dot = [tile(16, 16, 32)]
    else:
        fma = [tile(m_fma, n_fma, bk, w, 2) for bk, w in ((256, 4), (1024, 8), (64, 4)) if m_fma * n_fma * bk <= FMA_PRODUCTS]
        dot = [tile(*t) for t in DOT_TILES["gathered" if gathered else "contiguous"]]
    if c_in == 1 and taps * c_out == 1:
        return fma
    return dot + fma if min(c_in, taps * c_out) < 16 else dot


@triton.jit
def _weight_grad_kernel(
    x_ptr, gy_ptr, out_ptr,
    N, C_in_g, C_out_g,
    I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W,
    SPLIT, PIXELS_PER_SPLIT,
    INT64_INDEX: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAPS_N: tl.constexpr,
):
    """One tile of (input channel) rows by (tap, output channel) columns of one group,
    over one pixel range.

    x_ptr:   input ``[N, C_in, I_D, I_H, I_W]``, strides ``(sxn, sxc, sxd, sxh, sxw)``.
    gy_ptr:  output gradient ``[N, C_out, O_D, O_H, O_W]``, strides ``(syn, ..., syw)``.
    out_ptr: ``[SPLIT, C_in, C_out_g, K_D*K_H*K_W]``, contiguous: with ``SPLIT == 1``
             ``grad_w`` itself in the input's dtype, otherwise the workspace of partial
             sums in the accumulator's dtype; this program writes its tile there.
    N, C_in_g, C_out_g: batch, input and output channels per group.
    I_*, O_*: input and output spatial sizes.
    K_*, S_*, P_*, D_*: kernel size, stride, padding, dilation per axis.
    SPLIT:   number of pixel ranges the reduction is split into.
    PIXELS_PER_SPLIT: pixels (of ``N*I_D*I_H*I_W``) in each range (an argument, though
             derivable: where Triton sees it divisible by 16, each range's input loads
             are vectorised and pipelined).
    INT64_INDEX: index in 64 bits (some offset reaches 2**31); 32 bits otherwise.
    OPERAND_DTYPE, INPUT_PRECISION: as in ``phase_gemm``.
    BLOCK_M, BLOCK_N, BLOCK_K: tile of input channels, (tap, output channel) columns,
             pixels; tiles of at least 16 a side multiply on tensor cores, smaller ones
             by FMA.
    TAPS_N:  taps per column tile (a power of two); each holds ``BLOCK_N // TAPS_N``
             output channels.
    """
    CO_N = BLOCK_N // TAPS_N
    taps = K_D * K_H * K_W
    pid = tl.program_id(0)
    group = tl.program_id(1) // SPLIT
    split = tl.program_id(1) % SPLIT
    tiles_c = tl.cdiv(C_out_g, CO_N)
    tiles_n = tl.cdiv(taps, TAPS_N) * tiles_c
    pid_m = pid // tiles_n
    pid_t = (pid % tiles_n) // tiles_c
    pid_c = pid % tiles_c

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_K)
    # Column j of the tile is (tap, output channel) = (pid_t*TAPS_N + j // CO_N, pid_c*CO_N + j % CO_N);
    # with one tap per tile, the tap is one value for the whole tile ([1, 1]), so that
    # everything derived from it below stays per row instead of per element.
    co = (pid_c * CO_N + offs_j % CO_N)[None, :]
    if TAPS_N == 1:
        tap = tl.zeros((1, 1), dtype=tl.int32) + pid_t
    else:
        tap = pid_t * TAPS_N + (offs_j // CO_N)[None, :]
    if INT64_INDEX:  # the pixel, channel and tap indices below derive from these
        offs_m = offs_m.to(tl.int64)
        offs_q = offs_q.to(tl.int64)
        co = co.to(tl.int64)
        tap = tap.to(tl.int64)
    mask_m = offs_m < C_in_g
    mask_n = (tap < taps) & (co < C_out_g)
    # Tap (kd, kh, kw) reads grad_y at o = i*s - p + kk*d: its share kk*d of o, per axis.
    tk_w = (tap % K_W) * D_W
    tk_h = ((tap // K_W) % K_H) * D_H
    tk_d = (tap // (K_W * K_H)) * D_D
    x_rows = x_ptr + (group * C_in_g + offs_m) * sxc
    gy_cols = gy_ptr + (group * C_out_g + co) * syc + tk_d * syd + tk_h * syh + tk_w * syw

    acc_dtype = tl.float64 if OPERAND_DTYPE == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    pixels = N * I_D * I_H * I_W
    start = split * PIXELS_PER_SPLIT
    stop = tl.minimum(start + PIXELS_PER_SPLIT, pixels)
    for q0 in range(start, stop, BLOCK_K):
        # Pixel q = ((n*I_D + i_d)*I_H + i_h)*I_W + i_w.
        q = q0 + offs_q
        i_w = q % I_W
        i_h = (q // I_W) % I_H
        i_d = (q // (I_W * I_H)) % I_D
        n = q // (I_W * I_H * I_D)
        in_range = q < stop
        # The pixel's share of o = i*s - p + kk*d per axis, and the output positions its
        # columns' taps reach ([BLOCK_K, 1] with one tap per tile, else per element).
        r_d = i_d * S_D - P_D
        r_h = i_h * S_H - P_H
        r_w = i_w * S_W - P_W
        o_d = r_d[:, None] + tk_d
        o_h = r_h[:, None] + tk_h
        o_w = r_w[:, None] + tk_w
        hits = in_range[:, None] & (o_d >= 0) & (o_d < O_D) & (o_h >= 0) & (o_h < O_H) & (o_w >= 0) & (o_w < O_W)
        a = tl.load(
            x_rows[:, None] + (n * sxn + i_d * sxd + i_h * sxh + i_w * sxw)[None, :],
            mask=mask_m[:, None] & in_range[None, :],
            other=0.0,
        )
        b = tl.load(
            gy_cols + (n * syn + r_d * syd + r_h * syh + r_w * syw)[:, None],
            mask=hits & mask_n,
            other=0.0,
        )
        if BLOCK_M >= 16 and BLOCK_N >= 16:
            acc = tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=acc_dtype)
        else:  # acc[ci, col] += sum_q a[ci, q] * b[q, col], one FMA per product
            acc += fma_dot(a.to(acc_dtype), b.to(acc_dtype))

    # grad_w[split][group*C_in_g + ci, co, tap]: the permute and (with one range) the cast.
    rows = split * (tl.num_programs(1) // SPLIT * C_in_g) + group * C_in_g + offs_m
    out = out_ptr + (rows[:, None] * C_out_g + co) * taps + tap
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n)


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, SIZE, SPLIT, BLOCK: tl.constexpr):
    """``out[i] = ws[0, i] + ws[1, i] + ... + ws[SPLIT-1, i]``, added in that order and
    cast to ``out``'s dtype.

    ws_ptr:  partial sums ``[SPLIT, SIZE]``, contiguous.
    out_ptr: the result ``[SIZE]``.
    SIZE, SPLIT: elements per partial, partials.
    BLOCK:   elements per program.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    partial = ws_ptr + offs
    total = tl.load(partial, mask=mask)
    for _ in range(1, SPLIT):
        partial += SIZE  # (pointer arithmetic: 64 bits, however large SPLIT * SIZE)
        total += tl.load(partial, mask=mask)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def default_split(pixels: int, programs: int, target_programs: int = 1024, min_pixels: int = 4096) -> int:
    """Ranges to split ``pixels`` into: enough programs to fill a GPU, none shorter than
    ``min_pixels`` (or 1 in the interpreter, where more programs only cost time)."""
    if INTERPRETING:
        return 1
    return max(1, min(-(-target_programs // programs), pixels // min_pixels))


SUM_BLOCK = 1024  # elements per program of the split sum (a memory-bound pass over a few MB)


@functools.lru_cache(maxsize=4096)
def plan_launch(x_layout: tuple, grad_y_layout: tuple, kernel_size: tuple, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, dtype: torch.dtype, allow_tf32: bool, split: int | None,
                int64_forced: bool) -> tuple[launcher.LaunchPlan, launcher.LaunchPlan | None, int]:
    """The launch plans of ``weight_grad`` for tensors of these layouts (``(shape,
    strides)`` pairs) and this geometry: the GEMM's, the split sum's (``None`` with one
    pixel range), and the number of ranges.  Tensors of 1 or 2 spatial axes run on the
    kernel's three, the missing leading ones of size 1."""
    lead = 3 - len(kernel_size)
    (x_shape, x_strides), (gy_shape, gy_strides) = (padded(layout, lead) for layout in (x_layout, grad_y_layout))
    kernel_size, stride = (1,) * lead + kernel_size, (1,) * lead + stride
    padding, dilation = (0,) * lead + padding, (1,) * lead + dilation
    n, c_in = x_shape[:2]
    c_in_g, c_out_g = c_in // groups, gy_shape[1] // groups
    taps = math.prod(kernel_size)
    pixels = n * math.prod(x_shape[2:])
    if split is None:
        split = default_split(pixels, groups * -(-c_in_g // 64) * -(-(taps * c_out_g) // 64))
    per_split = -(-pixels // split)
    precision = input_precision(dtype, allow_tf32)
    channels_last = x_strides[1] == 1 and c_in > 1

    def grid(meta):
        channels = meta["BLOCK_N"] // meta["TAPS_N"]
        columns = -(-taps // meta["TAPS_N"]) * -(-c_out_g // channels)
        return -(-c_in_g // meta["BLOCK_M"]) * columns, groups * split

    def problem() -> Problem:
        """One GEMM per (group, pixel range)."""
        name = "tf32" if precision == "tf32" else str(dtype).removeprefix("torch.")
        return Problem((Part(groups * split, c_in_g, taps * c_out_g, per_split, 1),), dtype.itemsize, name,
                       ("BLOCK_M", "BLOCK_N"))

    gemm = launcher.LaunchPlan(
        scalars=(
            n, c_in_g, c_out_g,
            *x_shape[2:], *gy_shape[2:],
            *x_strides, *gy_strides,
            *kernel_size, *stride, *padding, *dilation,
            split, per_split,
        ),
        constants=dict(INT64_INDEX=int64_forced or spans_int64(x_shape, x_strides) or spans_int64(gy_shape, gy_strides)
                       or spans_int64((split * c_in * c_out_g * taps,), (1,)),  # (the gradient or its workspace)
                       OPERAND_DTYPE=operand_dtype(dtype), INPUT_PRECISION=precision),
        grid=grid,
        # The shape class a tuning is kept for: the GEMM's M (channels per group) and N
        # (taps × channels per group), the groups, its K (pixels per split, bucketed),
        # the geometry that decides which pixels hit (kernel size, stride, padding,
        # dilation), the access pattern (channels-last or not), the dtype and dot precision.
        key=(c_in_g, c_out_g, groups, *kernel_size, *stride, *padding, *dilation, str(dtype), precision,
             channels_last, bucket(per_split)),
        configs=lambda: configs(c_in_g, c_out_g, taps, gathered=not channels_last),
        problem=problem,
    )
    if split == 1:
        return gemm, None, split
    size = c_in * c_out_g * taps
    total = launcher.LaunchPlan(
        scalars=(size, split), constants={}, grid=lambda meta: (-(-size // meta["BLOCK"]),),
        key=(str(dtype),),  # one configuration: nothing to tune
        configs=lambda: [dict(BLOCK=SUM_BLOCK, num_warps=4, num_stages=1)], problem=lambda: None)
    return gemm, total, split


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
) -> torch.Tensor:
    """``grad_w`` ``[C_in, C_out/groups, *kernel_size]`` (contiguous, ``x``'s dtype) of a
    transposed convolution of ``x`` ``[N, C_in, *spatial]`` that produced ``grad_y``
    ``[N, C_out, *spatial']`` (1 to 3 spatial axes, any strides; the geometry has one
    entry per axis).  ``split`` overrides the number of pixel ranges (default:
    ``default_split``)."""
    gemm, total, split = plan_launch(
        (x.shape, x.stride()), (grad_y.shape, grad_y.stride()), tuple(kernel_size), tuple(stride), tuple(padding),
        tuple(dilation), groups, x.dtype, allow_tf32, split, int64_forced())
    grad = allocated(torch.empty((x.shape[1], grad_y.shape[1] // groups, *kernel_size), dtype=x.dtype, device=x.device))
    if total is None:
        launcher.launch(gemm.request("weight_grad", _weight_grad_kernel, (x, grad_y, grad), x.device, grad))
        return grad
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    workspace = allocated(torch.empty((split, *grad.shape), dtype=acc_dtype, device=x.device))
    launcher.launch(gemm.request("weight_grad", _weight_grad_kernel, (x, grad_y, workspace), x.device, workspace))
    launcher.launch(total.request("split_sum", _sum_splits_kernel, (workspace, grad), x.device, grad))
    return grad
