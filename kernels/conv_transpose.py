"""Transposed convolution by stride-phase (sub-pixel) decomposition: the Triton kernel
and its launcher.

Output pixel ``(oh, ow)`` with ``q = o + p`` has phase ``r = q % s`` and ``u = q // s``
along each axis.  Only the taps with ``kk*d ≡ r (mod s)`` meet a real input pixel,
and they meet ``x[u - (kk*d - r)/s]``.  So each of the ``s_h*s_w`` phases is a dense
stride-1 convolution of the real input, computed here as an implicit GEMM:

    rows      m = (n, u_h, u_w)          the phase's output pixels,
    columns   co                         output channels of the group,
    reduction (tap_h, tap_w, ci)         the phase's taps × input channels of the group.

One launch covers every phase and group: grid = (row tiles × column tiles, phase, group).
No zero is inserted, loaded or multiplied; a phase with no taps reduces over nothing
and its outputs are the bias alone.

``tritondeconv.planner`` does the same arithmetic in plain Python (and the tests
hold both to PyTorch).
"""
import math
import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("TRITONDECONV_AUTOTUNE", "1") != "0"


def _configs():
    """Tile configurations to autotune over.

    Under ``TRITON_INTERPRET=1`` nothing can be timed, and with
    ``TRITONDECONV_AUTOTUNE=0`` nothing should be: then there is exactly one
    configuration, and the autotuner skips benchmarking.
    """
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1})]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (64, 32, 32, 4, 4),
            (128, 16, 32, 4, 3),
            (64, 64, 64, 4, 3),
            (128, 128, 64, 8, 3),
            (32, 32, 16, 2, 4),
            (128, 16, 16, 4, 4),
        ]
    ]


@triton.jit
def _axis_phase(r, K, S, P, D, G, INV, size_out):
    """Taps and output range of phase ``r`` along one axis (all scalars).

    With ``g = gcd(d, s)``, ``kk*d ≡ r (mod s)`` has solutions only when ``g | r``;
    they are ``kk0 + j*(s/g)`` with ``kk0 = (r/g) * inv(d/g mod s/g) mod (s/g)``,
    and tap ``j`` reads ``x[u - off0 - j*(d/g)]`` with ``off0 = (kk0*d - r)/s >= 0``.
    The phase's outputs ``o = u*s - p + r`` in ``[0, size_out)`` have
    ``u`` in ``[ceil((p-r)/s), floor((size_out-1+p-r)/s)]``.
    Triton's ``//`` truncates, so the numerators of the ``u`` bounds are kept
    non-negative (``p >= 0``, ``r < s``, ``size_out >= 1``).
    """
    kk0 = ((r // G) * INV) % (S // G)
    n_taps = tl.where((r % G == 0) & (kk0 < K), (K - kk0 + S // G - 1) // (S // G), 0)
    off0 = (kk0 * D - r) // S  # exact when the phase has taps, unused when it has none
    u_start = (P - r + S - 1) // S
    count = tl.maximum((size_out - 1 + P - r + S) // S - u_start, 0)
    return kk0, n_taps, off0, u_start, count


@triton.autotune(configs=_configs(), key=["C_in_g", "C_out_g", "K_H", "K_W", "S_H", "S_W", "M_BUCKET"])
@triton.jit
def _conv_transpose2d_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, H, W, H_out, W_out, C_in_g, C_out_g,
    sxn, sxc, sxh, sxw,
    swi, swo, swh, sww,
    syn, syc, syh, syw,
    K_H, K_W, S_H, S_W, P_H, P_W, D_H, D_W,
    G_H, G_W, INV_H, INV_W,
    M_MAX, M_BUCKET,
    HAS_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (row tile, column tile) of one phase of one group.

    x_ptr:   input ``[N, C_in, H, W]``, any strides ``(sxn, sxc, sxh, sxw)``.
    w_ptr:   weight ``[C_in, C_out/groups, K_H, K_W]``, any strides ``(swi, swo, swh, sww)``.
    b_ptr:   bias ``[C_out]`` (read only when ``HAS_BIAS``).
    y_ptr:   output ``[N, C_out, H_out, W_out]``, any strides ``(syn, syc, syh, syw)``.
    N, H, W, H_out, W_out: batch and spatial sizes.
    C_in_g, C_out_g: input and output channels per group.
    K_*, S_*, P_*, D_*: kernel size, stride, padding, dilation per axis.
    G_*:     ``gcd(D, S)`` per axis.
    INV_*:   the inverse of ``D/G`` modulo ``S/G`` per axis (0 when ``S/G == 1``).
    M_MAX:   rows of the largest phase, ``N * ceil(H_out/S_H) * ceil(W_out/S_W)``:
             the row tiles of the grid are laid out for it.
    M_BUCKET: ``M_MAX`` rounded up to a power of two; an autotuning key only, so that
             nearby image sizes share one tuning.
    HAS_BIAS: add ``b`` in the epilogue.
    OPERAND_DTYPE: dtype the tiles are fed to ``tl.dot`` in (the input's dtype, except
             that the interpreter multiplies bf16 as fp32, which it cannot do natively).
    INPUT_PRECISION: ``"tf32"`` or ``"ieee"`` for fp32 operands.
    BLOCK_M, BLOCK_N, BLOCK_K: tile of rows, output channels, input channels.
    GROUP_M: row tiles that share a column sweep (L2 reuse of the weight tile).
    """
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    group = tl.program_id(2)

    # Grouped ordering of (row tile, column tile) for L2 reuse.
    num_pid_m = tl.cdiv(M_MAX, BLOCK_M)
    num_pid_n = tl.cdiv(C_out_g, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows

    # This program's phase (r_h, r_w) and, per axis, its taps and output range.
    r_h = phase // S_W
    r_w = phase % S_W
    kh0, taps_h, off_h, u0_h, U_h = _axis_phase(r_h, K_H, S_H, P_H, D_H, G_H, INV_H, H_out)
    kw0, taps_w, off_w, u0_w, U_w = _axis_phase(r_w, K_W, S_W, P_W, D_W, G_W, INV_W, W_out)
    M = N * U_h * U_w

    # Rows: m = (n * U_h + uh) * U_w + uw, output pixel o = (u0 + uh)*s - p + r.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    uw = offs_m % tl.maximum(U_w, 1)
    uh = (offs_m // tl.maximum(U_w, 1)) % tl.maximum(U_h, 1)
    n = offs_m // tl.maximum(U_w * U_h, 1)
    u_h = u0_h + uh
    u_w = u0_w + uw
    # Tap j of the phase reads x[u - off0 - j*(d/g)].
    ih0 = u_h - off_h
    iw0 = u_w - off_w
    step_ih = D_H // G_H
    step_iw = D_W // G_W
    step_kh = S_H // G_H
    step_kw = S_W // G_W

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out_g
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + n * sxn + (group * C_in_g) * sxc
    w_cols = w_ptr + (group * C_in_g) * swi + offs_n * swo

    acc_dtype = tl.float64 if OPERAND_DTYPE == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)

    # Reduction over (tap_h, tap_w, channel block), flattened into one loop so that it
    # pipelines; a tile past the end of its phase (M <= pid_m*BLOCK_M) reduces over nothing.
    k_blocks = tl.cdiv(C_in_g, BLOCK_K)
    n_iter = tl.where(pid_m * BLOCK_M < M, taps_h * taps_w * k_blocks, 0)
    for it in range(0, n_iter):
        tap = it // k_blocks
        c0 = (it % k_blocks) * BLOCK_K
        jh = tap // taps_w
        jw = tap % taps_w
        ih = ih0 - jh * step_ih
        iw = iw0 - jw * step_iw
        kh = kh0 + jh * step_kh
        kw = kw0 + jw * step_kw
        cin = c0 + offs_k
        mask_k = cin < C_in_g
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            x_rows[:, None] + ih[:, None] * sxh + iw[:, None] * sxw + cin[None, :] * sxc,
            mask=row_ok[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            w_cols[None, :] + cin[:, None] * swi + kh * swh + kw * sww,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + group * C_out_g + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]

    oh = u_h * S_H - P_H + r_h
    ow = u_w * S_W - P_W + r_w
    y = y_ptr + n[:, None] * syn + (group * C_out_g + offs_n)[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _axis_constants(stride: int, dilation: int) -> tuple[int, int]:
    """``gcd(d, s)`` and the inverse of ``d/g`` modulo ``s/g`` for one axis."""
    g = math.gcd(dilation, stride)
    modulus = stride // g
    return g, (pow(dilation // g, -1, modulus) if modulus > 1 else 0)


_OPERAND_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def conv_transpose2d_into(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    allow_tf32: bool,
) -> torch.Tensor:
    """Launch the kernel, writing ``out`` (``[N, C_out, H_out, W_out]``, any strides).

    The caller has checked every argument and allocated ``out``; output padding is
    already part of ``out``'s size.  Returns ``out``.
    """
    n, c_in, h, w = x.shape
    _, c_out_g, k_h, k_w = weight.shape
    h_out, w_out = out.shape[2:]
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = stride, padding, dilation
    g_h, inv_h = _axis_constants(s_h, d_h)
    g_w, inv_w = _axis_constants(s_w, d_w)
    m_max = n * triton.cdiv(h_out, s_h) * triton.cdiv(w_out, s_w)
    operand = _OPERAND_DTYPES[x.dtype]
    if INTERPRETING and x.dtype == torch.bfloat16:
        operand = tl.float32

    def grid(meta):
        tiles = triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(c_out_g, meta["BLOCK_N"])
        return (tiles, s_h * s_w, groups)

    _conv_transpose2d_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        n, h, w, h_out, w_out, c_in // groups, c_out_g,
        *x.stride(), *weight.stride(), *out.stride(),
        k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w,
        g_h, g_w, inv_h, inv_w,
        m_max, triton.next_power_of_2(m_max),
        HAS_BIAS=bias is not None,
        OPERAND_DTYPE=operand,
        INPUT_PRECISION="tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee",
    )
    return out
