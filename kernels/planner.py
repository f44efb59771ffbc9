"""Stride-phase planning of a transposed convolution (pure Python, no tensors).

A transposed convolution scatters each input pixel ``x[i]`` into the output at
``o = i*s - p + kk*d`` for every tap ``kk`` of the weight (``kernel_size`` taps per
axis).  Read backwards, output
``o`` gathers from the taps with ``(o + p - kk*d) % s == 0``.  Write ``q = o + p``,
``r = q % s`` (the output's *phase*) and ``u = q // s``.  Then only the taps with
``kk*d ≡ r (mod s)`` ever meet a real input pixel, and they meet ``x[u - (kk*d - r)/s]``.

Every phase is therefore a dense stride-1 convolution of the real input with a
sub-filter of about ``k/s`` taps; the ``s`` phases of an axis partition the output.
In 2-D the phases of the two axes combine into ``s_h * s_w`` independent implicit
GEMMs.  This module lists them, and counts the multiply-adds that the naive
zero-insertion method spends against the decomposed one.

The Triton kernel in ``phase_gemm`` evaluates the same
arithmetic on the device, with the per-axis constants of ``axis_constants`` (its ``_axis``); the
tests check both against PyTorch, and the kernel's gathers against ``plan_axis``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AxisPhase:
    """One phase of one spatial axis.

    Its outputs are ``out_start, out_start + stride, ...`` (``count`` of them); the
    output ``o = u*stride - padding + residue`` reads input ``x[u - offsets[j]]``
    through tap ``taps[j]``.
    """

    residue: int
    taps: tuple[int, ...]
    offsets: tuple[int, ...]
    out_start: int
    count: int
    stride: int

    @property
    def out_indices(self) -> range:
        """The output indices of this phase along the axis."""
        return range(self.out_start, self.out_start + self.stride * self.count, self.stride)


@dataclass(frozen=True)
class AxisPlan:
    """The decomposition of one spatial axis."""

    size_in: int
    size_out: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    output_padding: int
    phases: tuple[AxisPhase, ...]

    def tap_outputs(self) -> int:
        """Σ over phases of outputs × taps: the decomposed work along this axis."""
        return sum(ph.count * len(ph.taps) for ph in self.phases)

    def one_pair_each(self) -> bool:
        """Whether every phase with outputs has one tap, whose inputs all lie inside the
        input (as with kernel size = stride and no padding): then every output gathers
        exactly one (input, tap) pair, and the axis is one dense product over the input,
        each pair's result landing on its own output ``i*s - p + kk*d`` (or outside the
        output, dropped), none left to the bias alone, none written twice.  (A tiny input
        can give one pair per output through a phase of several taps; that is not
        looked for.)"""
        for phase in self.phases:
            if phase.count == 0:
                continue
            if len(phase.taps) != 1:
                return False
            first = (phase.out_start + self.padding - phase.residue) // self.stride - phase.offsets[0]
            if first < 0 or first + phase.count > self.size_in:
                return False
        return True

    def hits(self) -> int:
        """(input, tap) pairs that land inside the output: the strictly useful work."""
        return sum(
            1
            for i in range(self.size_in)
            for kk in range(self.kernel_size)
            if 0 <= i * self.stride - self.padding + kk * self.dilation < self.size_out
        )


def output_size(size_in: int, kernel_size: int, stride: int, padding: int, dilation: int, output_padding: int) -> int:
    """PyTorch's output length of a transposed convolution along one axis."""
    return (size_in - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1


def axis_constants(stride: int, dilation: int) -> tuple[int, int]:
    """``g = gcd(d, s)`` and the inverse of ``d/g`` modulo ``s/g`` (0 when ``s/g`` is 1):
    with them, the taps of a phase follow without searching (``phase_taps``), which is
    how the Triton kernel finds them on the device."""
    g = math.gcd(dilation, stride)
    modulus = stride // g
    return g, (pow(dilation // g, -1, modulus) if modulus > 1 else 0)


def phase_taps(residue: int, kernel_size: int, stride: int, dilation: int) -> range:
    """The taps ``kk`` of phase ``r``: those with ``kk*d ≡ r (mod s)``.  With ``g, inv =
    axis_constants(s, d)`` there are none unless ``g | r``; then they are every
    ``(s/g)``-th tap from ``kk0 = (r/g)*inv mod (s/g)``."""
    g, inverse = axis_constants(stride, dilation)
    if residue % g:
        return range(0)
    step = stride // g
    return range((residue // g) * inverse % step, kernel_size, step)


def plan_axis(size_in: int, kernel_size: int, stride: int, padding: int = 0, dilation: int = 1,
              output_padding: int = 0) -> AxisPlan:
    """Split one axis of a transposed convolution into its ``stride`` phases."""
    if min(size_in, kernel_size, stride, dilation) < 1 or min(padding, output_padding) < 0:
        raise ValueError(
            "plan_axis: needs size_in, kernel_size, stride, dilation >= 1 and padding, output_padding >= 0; got "
            f"size_in={size_in}, kernel_size={kernel_size}, stride={stride}, padding={padding}, "
            f"dilation={dilation}, output_padding={output_padding}"
        )
    size_out = output_size(size_in, kernel_size, stride, padding, dilation, output_padding)
    phases = []
    for r in range(stride):
        taps = tuple(phase_taps(r, kernel_size, stride, dilation))
        offsets = tuple((kk * dilation - r) // stride for kk in taps)
        # o = u*s - p + r must lie in [0, size_out):  u in [ceil((p-r)/s), floor((size_out-1+p-r)/s)].
        u_start = -((r - padding) // stride)
        u_stop = (size_out - 1 + padding - r) // stride + 1
        out_start = u_start * stride - padding + r
        phases.append(AxisPhase(r, taps, offsets, out_start, max(0, u_stop - u_start), stride))
    return AxisPlan(size_in, size_out, kernel_size, stride, padding, dilation, output_padding, tuple(phases))


@dataclass(frozen=True)
class Plan:
    """The decomposition of a transposed convolution over all its spatial axes."""

    axes: tuple[AxisPlan, ...]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(a.size_out for a in self.axes)

    @property
    def phases(self) -> list[tuple[AxisPhase, ...]]:
        """Every combination of axis phases: ``prod(stride)`` dense convolutions."""
        return list(itertools.product(*(a.phases for a in self.axes)))

    def macs(self, batch: int, in_channels: int, out_channels: int, groups: int = 1) -> dict[str, int]:
        """Multiply-adds of the three ways to compute the layer.

        ``naive``: a stride-1 convolution over the zero-inserted, padded input; every
        output pixel meets every tap.  ``decomposed``: what the phase decomposition does,
        every output of a phase meets that phase's taps.  ``useful``: (input, tap)
        pairs that land inside the output, the work nobody can avoid.
        """
        per_pixel = batch * out_channels * (in_channels // groups)
        naive = per_pixel * math.prod(a.size_out * a.kernel_size for a in self.axes)
        decomposed = per_pixel * math.prod(a.tap_outputs() for a in self.axes)
        useful = per_pixel * math.prod(a.hits() for a in self.axes)
        return {"naive": naive, "decomposed": decomposed, "useful": useful}


def plan(
    input_size: int | tuple[int, ...],
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    output_padding: int | tuple[int, ...] = 0,
) -> Plan:
    """Plan every spatial axis.  Each argument is an int (the same on every axis) or a
    tuple with one entry per axis, as PyTorch's convolutions take them; the rank is the
    length of the tuples (1 when all are ints)."""
    args = (input_size, kernel_size, stride, padding, dilation, output_padding)
    lengths = {len(a) for a in args if isinstance(a, (tuple, list))}
    if len(lengths) > 1:
        raise ValueError("plan: every tuple argument needs one entry per spatial axis, but got lengths "
                         f"{sorted(lengths)}")
    rank = lengths.pop() if lengths else 1
    per_axis = [tuple(a) if isinstance(a, (tuple, list)) else (a,) * rank for a in args]
    return Plan(tuple(plan_axis(*axis) for axis in zip(*per_axis)))
