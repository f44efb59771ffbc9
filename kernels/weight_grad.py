"""The weight gradient of a transposed convolution: the Triton kernel and its launcher.

For ``y = conv_transpose(x, w)`` (stride s, padding p, dilation d, per axis),

    grad_w[ci, co, kk] = Σ_{n, i} x[n, ci, i] · grad_y[n, co, i*s - p + kk*d]

which is, for every tap ``kk``, a GEMM of ``C_in/groups × C_out/groups`` reducing over
all ``N·D·H·W`` input pixels: only real pixels are read, no zero is inserted.  That
reduction is long, so it is split into ``split`` contiguous ranges of pixels, each
program writes its partial tile to a workspace, and the launcher sums the partials
over the split axis in a fixed order: no atomics, bitwise-identical runs.

Grid: (row tiles × column tiles, tap, group × split).
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


def configs(c_in: int, c_out: int, interpreter: bool = INTERPRETING) -> list[dict]:
    """Launch configurations to choose from for per-tap GEMMs of ``c_in × c_out``
    channels per group reducing over pixels (pruned and ranked by the launcher).  Tensor-core tiles, deep in the pixel reduction; when either
    channel count is below 16 (``tl.dot``'s minimum), also FMA tiles as wide as the
    channels (only those for depthwise layers), as in ``phase_gemm.configs``.  In the
    interpreter (``interpreter``), one small tile per path."""
    m_fma, n_fma = min(triton.next_power_of_2(c_in), 16), min(triton.next_power_of_2(c_out), 16)
    if interpreter:
        fma = [config(m_fma, n_fma, 32)]
        dot = [config(16, 16, 32)]
    else:
        fma = [config(m_fma, n_fma, bk, num_warps=w, num_stages=2)
               for bk, w in ((256, 4), (1024, 8), (64, 4)) if m_fma * n_fma * bk <= FMA_PRODUCTS]
        dot = [config(bm, bn, bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in (
            (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
            (128, 128, 32, 8, 4), (64, 64, 128, 4, 3), (32, 32, 128, 4, 3), (16, 16, 256, 4, 3),
        )]
    if c_in == 1 and c_out == 1:
        return fma
    return dot + fma if min(c_in, c_out) < 16 else dot


@triton.jit
def _weight_grad_kernel(
    x_ptr, gy_ptr, ws_ptr,
    N, C_in_g, C_out_g,
    I_D, I_H, I_W, O_D, O_H, O_W,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    K_D, K_H, K_W, S_D, S_H, S_W, P_D, P_H, P_W, D_D, D_H, D_W,
    SPLIT, PIXELS_PER_SPLIT,
    INT64_INDEX: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (C_in tile, C_out tile) of one tap of one group, over one pixel range.

    x_ptr:  input ``[N, C_in, I_D, I_H, I_W]``, strides ``(sxn, sxc, sxd, sxh, sxw)``.
    gy_ptr: output gradient ``[N, C_out, O_D, O_H, O_W]``, strides ``(syn, ..., syw)``.
    ws_ptr: workspace ``[SPLIT, groups, K_D*K_H*K_W, C_in_g, C_out_g]``, contiguous, in the
            accumulator's dtype; this program writes its partial sum there.
    N, C_in_g, C_out_g: batch, input and output channels per group.
    I_*, O_*: input and output spatial sizes.
    K_*, S_*, P_*, D_*: kernel size, stride, padding, dilation per axis.
    SPLIT:  number of pixel ranges the reduction is split into.
    PIXELS_PER_SPLIT: pixels (of ``N*I_D*I_H*I_W``) in each range.
    INT64_INDEX: index in 64 bits (some offset reaches 2**31); 32 bits otherwise.
    OPERAND_DTYPE, INPUT_PRECISION: as in ``phase_gemm``.
    BLOCK_M, BLOCK_N, BLOCK_K: tile of input channels, output channels, pixels; channel
            tiles of at least 16 multiply on tensor cores, smaller ones by FMA.
    """
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    group = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    num_pid_n = tl.cdiv(C_out_g, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    # Tap (kd, kh, kw) reads grad_y at o = i*s - p + kk*d.
    kw = tap % K_W
    kh = (tap // K_W) % K_H
    kd = tap // (K_W * K_H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_K)
    if INT64_INDEX:  # the pixel and channel indices below derive from these
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_q = offs_q.to(tl.int64)
    mask_m = offs_m < C_in_g
    mask_n = offs_n < C_out_g
    x_cols = x_ptr + (group * C_in_g + offs_m) * sxc
    gy_cols = gy_ptr + (group * C_out_g + offs_n) * syc

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
        o_d = i_d * S_D - P_D + kd * D_D
        o_h = i_h * S_H - P_H + kh * D_H
        o_w = i_w * S_W - P_W + kw * D_W
        in_range = q < stop
        hits = in_range & (o_d >= 0) & (o_d < O_D) & (o_h >= 0) & (o_h < O_H) & (o_w >= 0) & (o_w < O_W)
        a = tl.load(
            x_cols[:, None] + (n * sxn + i_d * sxd + i_h * sxh + i_w * sxw)[None, :],
            mask=mask_m[:, None] & hits[None, :],
            other=0.0,
        )
        b = tl.load(
            gy_cols[None, :] + (n * syn + o_d * syd + o_h * syh + o_w * syw)[:, None],
            mask=hits[:, None] & mask_n[None, :],
            other=0.0,
        )
        if BLOCK_M >= 16 and BLOCK_N >= 16:
            acc = tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=acc_dtype)
        else:  # acc[ci, co] += sum_q a[ci, q] * b[q, co], one FMA per product
            acc += fma_dot(a.to(acc_dtype), b.to(acc_dtype))

    taps = K_D * K_H * K_W
    ws = ws_ptr + (((split * (tl.num_programs(2) // SPLIT) + group) * taps + tap) * C_in_g) * C_out_g
    tl.store(ws + offs_m[:, None] * C_out_g + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def default_split(pixels: int, programs: int, target_programs: int = 1024, min_pixels: int = 4096) -> int:
    """Ranges to split ``pixels`` into: enough programs to fill a GPU, none shorter than
    ``min_pixels`` (or 1 in the interpreter, where more programs only cost time)."""
    if INTERPRETING:
        return 1
    return max(1, min(-(-target_programs // programs), pixels // min_pixels))


@functools.lru_cache(maxsize=4096)
def plan_launch(x_layout: tuple, grad_y_layout: tuple, kernel_size: tuple, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, dtype: torch.dtype, allow_tf32: bool, split: int | None,
                int64_forced: bool) -> tuple[launcher.LaunchPlan, tuple]:
    """The launch plan of ``weight_grad`` for tensors of these layouts (``(shape,
    strides)`` pairs) and this geometry, and the workspace's shape.  Tensors of 1 or 2
    spatial axes run on the kernel's three, the missing leading ones of size 1."""
    lead = 3 - len(kernel_size)
    (x_shape, x_strides), (gy_shape, gy_strides) = (padded(layout, lead) for layout in (x_layout, grad_y_layout))
    kernel_size, stride = (1,) * lead + kernel_size, (1,) * lead + stride
    padding, dilation = (0,) * lead + padding, (1,) * lead + dilation
    n, c_in = x_shape[:2]
    c_in_g, c_out_g = c_in // groups, gy_shape[1] // groups
    taps = math.prod(kernel_size)
    pixels = n * math.prod(x_shape[2:])
    if split is None:
        split = default_split(pixels, taps * groups * -(-c_in_g // 64) * -(-c_out_g // 64))
    per_split = -(-pixels // split)
    precision = input_precision(dtype, allow_tf32)

    def grid(meta):
        return (-(-c_in_g // meta["BLOCK_M"]) * -(-c_out_g // meta["BLOCK_N"]), taps, groups * split)

    def problem() -> Problem:
        """One GEMM per (tap, group, pixel range)."""
        name = "tf32" if precision == "tf32" else str(dtype).removeprefix("torch.")
        return Problem((Part(taps * groups * split, c_in_g, c_out_g, per_split, 1),), dtype.itemsize, name,
                       ("BLOCK_M", "BLOCK_N"))

    plan = launcher.LaunchPlan(
        scalars=(
            n, c_in_g, c_out_g,
            *x_shape[2:], *gy_shape[2:],
            *x_strides, *gy_strides,
            *kernel_size, *stride, *padding, *dilation,
            split, per_split,
        ),
        constants=dict(INT64_INDEX=int64_forced or spans_int64(x_shape, x_strides) or spans_int64(gy_shape, gy_strides),
                       OPERAND_DTYPE=operand_dtype(dtype), INPUT_PRECISION=precision),
        grid=grid,
        # The shape class a tuning is kept for: the GEMM's M and N (channels per group),
        # the groups, its K (pixels per split, bucketed), the geometry that decides which
        # pixels hit (kernel size, stride, padding, dilation), the access pattern
        # (channels-last or not), the dtype and dot precision.
        key=(c_in_g, c_out_g, groups, *kernel_size, *stride, *padding, *dilation, str(dtype), precision,
             x_strides[1] == 1 and c_in > 1, bucket(per_split)),
        configs=lambda: configs(c_in_g, c_out_g),
        problem=problem,
    )
    return plan, (split, groups, *kernel_size, c_in_g, c_out_g)


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
    plan, workspace_shape = plan_launch(
        (x.shape, x.stride()), (grad_y.shape, grad_y.stride()), tuple(kernel_size), tuple(stride), tuple(padding),
        tuple(dilation), groups, x.dtype, allow_tf32, split, int64_forced())
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    workspace = allocated(torch.empty(workspace_shape, dtype=acc_dtype, device=x.device))
    launcher.launch(plan.request("weight_grad", _weight_grad_kernel, (x, grad_y, workspace), x.device, workspace))
    # Sum the partials in a fixed order, then [groups, kD, kH, kW, ci, co] -> [C_in, C_out/g, *kernel_size],
    # written straight into the result (through a [groups, ci, co, kD, kH, kW] view of it).
    total = workspace.sum(0) if workspace_shape[0] > 1 else workspace[0]
    grad = allocated(torch.empty((x.shape[1], workspace_shape[-1], *kernel_size), dtype=x.dtype, device=x.device))
    grad.view(groups, *workspace_shape[-2:], *workspace_shape[2:5]).copy_(total.permute(0, 4, 5, 1, 2, 3))
    return grad
