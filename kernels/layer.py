"""A layer as the phase-decomposed kernels read it: the maps of one stride phase along
one axis (on the device, ``axis_maps``), and the launch arguments and GEMM shapes that
the phase GEMM's and the grouped kernel's launch plans share (on the host, ``layer``).

The arithmetic is the planner's (``planner``), in the form the kernels index with; the
phase GEMM's module docstring (``phase_gemm``) writes out the maps for both directions.
"""
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import padded, spans_int64
from .cost import Part
from .planner import axis_constants, output_size, plan_axis


@triton.jit
def axis_maps(r, K, S, P, D, G, INV, size_out, TRANSPOSED: tl.constexpr):
    """The affine maps of phase ``r`` along one axis (all scalars).

    Returns ``(kk0, kk_step, n_taps, i0, i_step, i_tap_step, o0, o_step, count)`` as in
    the module docstring.  For the transposed direction, with ``g = gcd(d, s)``,
    ``kk*d ≡ r (mod s)`` has solutions only when ``g | r``; they are ``kk0 + j*(s/g)``
    with ``kk0 = (r/g) * inv(d/g mod s/g) mod (s/g)``, and tap ``j`` reads
    ``x[u - off0 - j*(d/g)]`` with ``off0 = (kk0*d - r)/s >= 0``.  The phase's outputs
    ``o = u*s - p + r`` in ``[0, size_out)`` have ``u`` in
    ``[ceil((p-r)/s), floor((size_out-1+p-r)/s)]``.  Triton's ``//`` truncates, so those
    numerators are kept non-negative (``p >= 0``, ``r < s``, ``size_out >= 1``).
    """
    if TRANSPOSED:
        kk0 = ((r // G) * INV) % (S // G)
        n_taps = tl.where((r % G == 0) & (kk0 < K), (K - kk0 + S // G - 1) // (S // G), 0)
        off0 = (kk0 * D - r) // S  # exact when the phase has taps, unused when it has none
        u0 = (P - r + S - 1) // S
        count = tl.maximum((size_out - 1 + P - r + S) // S - u0, 0)
        return kk0, S // G, n_taps, u0 - off0, 1, -(D // G), u0 * S - P + r, S, count
    else:
        return 0, 1, K, -P, S, D, 0, 1, size_out



@triton.jit
def phase_rows(offs_m, T_D, T_H, T_W):
    """The rows ``m = ((n*T_D + t_d)*T_H + t_h)*T_W + t_w`` of a phase (``T_*`` rows per
    axis; an axis of none is taken as one) decoded into ``(n, t_d, t_h, t_w)``."""
    t_w = offs_m % tl.maximum(T_W, 1)
    rest = offs_m // tl.maximum(T_W, 1)
    t_h = rest % tl.maximum(T_H, 1)
    rest = rest // tl.maximum(T_H, 1)
    t_d = rest % tl.maximum(T_D, 1)
    n = rest // tl.maximum(T_D, 1)
    return n, t_d, t_h, t_w


@triton.jit
def next_step(kb, jw, jh, jd, k_blocks, taps_w, taps_h):
    """The reduction loop's next position (channel block ``kb``, taps ``jw, jh, jd``):
    ``kb + 1``, carrying into ``jw``, ``jh``, ``jd`` at ``k_blocks``, ``taps_w``,
    ``taps_h``, an odometer of compares and selects on scalars (decoding the position
    from the iteration number would take runtime divisions every step)."""
    kb += 1
    carry = kb == k_blocks
    kb = tl.where(carry, 0, kb)
    jw = tl.where(carry, jw + 1, jw)
    carry = jw == taps_w
    jw = tl.where(carry, 0, jw)
    jh = tl.where(carry, jh + 1, jh)
    carry = jh == taps_h
    jh = tl.where(carry, 0, jh)
    jd = tl.where(carry, jd + 1, jd)
    return kb, jw, jh, jd


@dataclass(frozen=True)
class Layer:
    """A launch's tensors and geometry as the phase-decomposed kernels read them (on
    their three spatial axes): what the phase GEMM's and the grouped kernel's launch plans share."""
    n: int
    groups: int
    c_red_g: int  # channels per group reduced over (transposed: input; direct: output)
    c_col_g: int  # channels per group produced
    phases: int  # stride phases (1 for the direct convolution)
    rows_per_phase: tuple  # along each axis: ceil(outputs / s) transposed, the outputs direct
    out_size: tuple  # the output's spatial sizes
    kernel_size: tuple
    stride: tuple
    padding: tuple
    scalars: tuple  # the kernels' arguments from the input's spatial sizes on
    axis_plans: tuple  # the planner's axes (transposed only)
    shape_key: tuple  # the GEMM's shape class, for a tuning key (see ``plan_launch``)
    layout_key: tuple  # the input's and the output's channels contiguous (and more than one)
    int64: bool  # some tensor needs 64-bit indices

    @property
    def m_max(self) -> int:
        """Rows of the largest phase (every output, for the direct convolution)."""
        return self.n * math.prod(self.rows_per_phase)

    def parts(self) -> list[Part]:
        """The GEMMs per phase (one per group): its rows and its taps (the direct
        convolution has one phase with every output and tap)."""
        if self.axis_plans:
            axes = [[(phase.count, len(phase.taps)) for phase in axis.phases] for axis in self.axis_plans]
        else:
            axes = [[(o, k)] for o, k in zip(self.out_size, self.kernel_size)]
        return [Part(self.groups, self.n * rd * rh * rw, self.c_col_g, self.c_red_g, td * th * tw)
                for rd, td in axes[0] for rh, th in axes[1] for rw, tw in axes[2]]


@functools.lru_cache(maxsize=4096)
def layer(out_layout: tuple, x_layout: tuple, weight_layout: tuple, residual_strides: tuple | None,
          stride: tuple, padding: tuple, dilation: tuple, groups: int, transposed: bool, dtype: torch.dtype,
          int64_forced: bool) -> Layer:
    """The ``Layer`` of tensors of these layouts (``(shape, strides)`` pairs) and this
    geometry.  Tensors of 1 or 2 spatial axes run on the kernels' three, the missing
    leading ones of size 1 (stride 1, padding 0, dilation 1)."""
    lead = 5 - len(x_layout[0])
    if residual_strides is not None:  # (the residual is shaped like the output)
        residual_strides = padded((out_layout[0], residual_strides), lead)[1]
    x_layout, weight_layout, out_layout = (padded(layout, lead) for layout in (x_layout, weight_layout, out_layout))
    stride, padding, dilation = (1,) * lead + stride, (0,) * lead + padding, (1,) * lead + dilation
    (x_shape, x_strides), (w_shape, w_strides), (out_shape, out_strides) = x_layout, weight_layout, out_layout
    n = x_shape[0]
    c_in, c_out_g = w_shape[:2]
    sw_in, sw_out = w_strides[:2]
    c_in_g = c_in // groups
    if transposed:  # reduce over the group's C_in, produce its C_out
        c_red_g, c_col_g, sw_red, sw_col, n_phases = c_in_g, c_out_g, sw_in, sw_out, math.prod(stride)
    else:  # reduce over the group's C_out, produce its C_in
        c_red_g, c_col_g, sw_red, sw_col, n_phases = c_out_g, c_in_g, sw_out, sw_in, 1
    consts = [axis_constants(s, d) for s, d in zip(stride, dilation)]
    kernel_size = w_shape[2:]
    # The planner's phases of each axis (transposed only): the cost model's GEMMs, and
    # whether the layer is also one GEMM over the input pixels (kernel size = stride).
    axis_plans = tuple(plan_axis(i, k, s, p, d, o - output_size(i, k, s, p, d, 0))
                       for i, k, s, p, d, o in zip(x_shape[2:], kernel_size, stride, padding, dilation, out_shape[2:])
                       ) if transposed else ()
    # Rows per phase along each axis: ceil(outputs / s) for the transposed direction.
    rows_per_phase = (tuple(-(-o // s) for o, s in zip(out_shape[2:], stride)) if transposed
                      else tuple(out_shape[2:]))
    layouts = [x_layout, weight_layout, out_layout] + ([(out_shape, residual_strides)] if residual_strides else [])
    return Layer(
        n=n, groups=groups, c_red_g=c_red_g, c_col_g=c_col_g, phases=n_phases, rows_per_phase=rows_per_phase,
        out_size=tuple(out_shape[2:]), kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
        scalars=(
            *x_shape[2:], *out_shape[2:],
            *x_strides,
            sw_red, sw_col, *w_strides[2:],
            *out_strides,
            *(residual_strides or out_strides),
            *kernel_size, *stride, *padding, *dilation,
            *(g for g, _ in consts), *(inv for _, inv in consts),
        ),
        axis_plans=axis_plans,
        shape_key=(transposed, c_red_g, c_col_g, groups, *kernel_size, *stride, *dilation, str(dtype)),
        layout_key=(x_strides[1] == 1 and x_shape[1] > 1, out_strides[1] == 1 and out_shape[1] > 1),
        int64=int64_forced or any(spans_int64(*layout) for layout in layouts),
    )
