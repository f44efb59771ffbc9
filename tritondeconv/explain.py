"""Print the stride-phase decomposition of a transposed convolution.

    python -m tritondeconv.explain --kernel-size 3 --stride 2 --padding 1 [--plot decomposition.png]
    python -m tritondeconv.explain --kernel-size 3 3 3 --stride 2     # 3-D (one value per axis)
    python -m tritondeconv.explain --kernel-size 4 --stride 2 --rank 1

Each size argument takes one int (every axis) or one per axis; the rank is the longest
(or ``--rank``, default 2).  The arguments are checked by the op itself (on meta
tensors), so a geometry the op refuses is refused here with the op's message.
``--plot`` draws a 2-D decomposition (needs matplotlib: ``pip install -e ".[perf]"``).

It only plans: the phases and multiply-add counts are derived from the geometry, and no
Triton kernel runs (``python -m tritondeconv.demo`` runs one).
"""
from __future__ import annotations

import argparse
import os
import sys

from .kernels.planner import AxisPlan, Plan, plan

AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_axis(name: str, axis: AxisPlan) -> list[str]:
    lines = [
        f"{name}: input {axis.size_in} -> output {axis.size_out} "
        f"(kernel_size {axis.kernel_size}, stride {axis.stride}, padding {axis.padding}, "
        f"dilation {axis.dilation}, output_padding {axis.output_padding})"
    ]
    for ph in axis.phases:
        outs = list(ph.out_indices)
        shown = ", ".join(map(str, outs[:6])) + (", ..." if len(outs) > 6 else "")
        if ph.taps:
            reads = " + ".join(f"w[{t}]*x[u-{o}]" for t, o in zip(ph.taps, ph.offsets))
        else:
            reads = "no taps: bias only"
        lines.append(f"  phase r={ph.residue}: {_plural(ph.count, 'output')} [{shown}]  "
                     f"{_plural(len(ph.taps), 'tap')} {list(ph.taps)}  y[o] = {reads}")
    return lines


def describe(p: Plan, batch: int, in_channels: int, out_channels: int, groups: int) -> str:
    rank = len(p.axes)
    lines = ["o: an output index; its phase r = (o + padding) mod stride; u = (o + padding - r) / stride, "
             "the input index it lines up with; x[u-j]: the input j places before u"]
    for name, axis in zip(AXIS_NAMES[rank], p.axes):
        lines += describe_axis(name, axis)
    phases = p.phases
    tap_counts = sorted({tuple(len(ph.taps) for ph in combo) for combo in phases})
    lines.append(
        f"{_plural(len(phases), 'phase')} in {rank}-D, each a dense stride-1 convolution; taps per phase "
        f"({' x '.join(n[0] for n in AXIS_NAMES[rank])}): " + ", ".join("x".join(map(str, c)) for c in tap_counts)
    )
    macs = p.macs(batch, in_channels, out_channels, groups)
    lines.append(
        f"multiply-adds for N={batch}, C_in={in_channels}, C_out={out_channels}, groups={groups}: "
        f"naive zero-insertion {macs['naive']:,}; decomposed {macs['decomposed']:,}; "
        f"useful (inputs that land in the output) {macs['useful']:,}"
    )
    saved = macs["naive"] - macs["decomposed"]
    lines.append(
        f"the decomposition skips {saved:,} multiply-adds ({saved / max(macs['naive'], 1):.1%} of naive), "
        f"{macs['naive'] / max(macs['decomposed'], 1):.2f}x fewer"
    )
    lines.append("counted from the plan; no Triton kernel was run (python -m tritondeconv.demo runs one)")
    return "\n".join(lines)


def draw(p: Plan, path: str, batch: int = 1, in_channels: int = 1, out_channels: int = 1, groups: int = 1) -> None:
    """Save ``figure(...)`` of a 2-D plan to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(p, batch, in_channels, out_channels, groups)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def figure(p: Plan, batch: int = 1, in_channels: int = 1, out_channels: int = 1, groups: int = 1):
    """A picture of the decomposition of a 2-D plan: the output grid coloured by phase,
    the weight's taps coloured by the phase that uses them, the multiply-adds of the
    naive and the decomposed methods, and a legend of the phases' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    axis_h, axis_w = p.axes
    n_w = axis_w.stride
    n_phases = axis_h.stride * n_w
    if n_phases <= 10:
        colours = list(plt.get_cmap("tab10").colors)
    elif n_phases <= 20:
        colours = list(plt.get_cmap("tab20").colors)
    else:  # evenly spaced hues stay distinct from each other (tab10 would repeat)
        colours = [plt.get_cmap("turbo")(i / (n_phases - 1)) for i in range(n_phases)]
    cmap = ListedColormap(colours[:n_phases])

    def phase_of_output(o, axis):
        return (o + axis.padding) % axis.stride

    fig, (ax_out, ax_k, ax_macs) = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.2, 1, 0.8]})

    # Output grid, each pixel coloured by its phase (r_h, r_w), labelled with its tap count.
    h_show, w_show = min(axis_h.size_out, 12), min(axis_w.size_out, 12)
    grid = [[phase_of_output(i, axis_h) * n_w + phase_of_output(j, axis_w) for j in range(w_show)]
            for i in range(h_show)]
    ax_out.imshow(grid, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5)
    taps_h = {ph.residue: len(ph.taps) for ph in axis_h.phases}
    taps_w = {ph.residue: len(ph.taps) for ph in axis_w.phases}
    for i in range(h_show):
        for j in range(w_show):
            t = taps_h[phase_of_output(i, axis_h)] * taps_w[phase_of_output(j, axis_w)]
            ax_out.text(j, i, str(t), ha="center", va="center", fontsize=8, color="white")
    ax_out.set_title(f"output pixels by phase (first {h_show}x{w_show});\nnumber = taps it needs")
    ax_out.set_xticks([]), ax_out.set_yticks([])

    # The weight's taps, each coloured by the phase whose sub-filter holds it.
    k_h, k_w = axis_h.kernel_size, axis_w.kernel_size
    owner = [[((kh * axis_h.dilation) % axis_h.stride) * n_w + (kw * axis_w.dilation) % axis_w.stride
              for kw in range(k_w)] for kh in range(k_h)]
    ax_k.imshow(owner, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5)
    labelled = k_h * k_w <= 64  # beyond 8x8 taps the labels would overlap: the colours say it
    for kh in range(k_h if labelled else 0):
        for kw in range(k_w):
            ax_k.text(kw, kh, f"w[{kh},{kw}]", ha="center", va="center", fontsize=8 if k_h * k_w <= 25 else 5,
                      color="white")
    ax_k.set_title(f"{k_h}x{k_w} weight taps: each belongs to one phase's\nsub-filter (same colour as its outputs)"
                   + ("" if labelled else "; tap labels omitted"))
    ax_k.set_xticks([]), ax_k.set_yticks([])

    macs = p.macs(batch, in_channels, out_channels, groups)
    names = ["naive\n(zero insertion)", "decomposed\n(stride phases)", "useful"]
    values = [macs["naive"], macs["decomposed"], macs["useful"]]
    bars = ax_macs.bar(names, values, color=["0.6", colours[0], colours[2]])
    ax_macs.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    ax_macs.set_title(f"multiply-adds: {macs['naive'] / max(macs['decomposed'], 1):.2f}x fewer")
    ax_macs.set_ylabel(f"MACs (N={batch}, C_in={in_channels}, C_out={out_channels})")

    from matplotlib.patches import Patch

    handles = [Patch(color=colours[rh * n_w + rw], label=f"r=({rh},{rw})")
               for rh in range(axis_h.stride) for rw in range(n_w)]
    fig.legend(handles=handles, title="phase (r_h, r_w)", loc="lower center", ncol=min(n_phases, 16),
               fontsize=7 if n_phases <= 16 else 5, title_fontsize=7, frameon=False)
    fig.suptitle(
        f"Transposed convolution, kernel_size {k_h}x{k_w}, stride {axis_h.stride}x{axis_w.stride}, padding "
        f"{axis_h.padding}x{axis_w.padding}, dilation {axis_h.dilation}x{axis_w.dilation}, input "
        f"{axis_h.size_in}x{axis_w.size_in}: {len(p.phases)} dense stride-1 convolutions, one per output phase"
    )
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (n_phases // 16), 1, 1))
    return fig


def _per_axis(values: list[int], rank: int, name: str) -> tuple[int, ...]:
    if len(values) == 1:
        return (values[0],) * rank
    if len(values) != rank:
        raise ValueError(f"{name} needs 1 or {rank} values for a {rank}-D geometry, but got {len(values)}")
    return tuple(values)


def _check_as_the_op_does(rank: int, a: argparse.Namespace, geometry: dict) -> None:
    """Call the op on meta tensors of this geometry: it raises exactly what a real call would."""
    import torch

    from . import registrations  # noqa: F401  (registers the ops)

    if a.groups < 1:
        raise ValueError(f"groups must be a positive integer, but got groups={a.groups}")
    for name in ("in_channels", "out_channels"):  # nn.ConvTranspose*d's own checks, in its order
        if getattr(a, name) % a.groups:
            raise ValueError(f"{name} must be divisible by groups, "
                             f"but got {name}={getattr(a, name)}, groups={a.groups}")
    x = torch.empty(a.batch, a.in_channels, *geometry["input_size"], device="meta")
    w = torch.empty(a.in_channels, a.out_channels // a.groups, *geometry["kernel_size"], device="meta")
    getattr(torch.ops.tritondeconv, f"conv_transpose{rank}d")(
        x, w, None, list(geometry["stride"]), list(geometry["padding"]), list(geometry["output_padding"]), a.groups,
        list(geometry["dilation"]))


def _check_plot_file(ap: argparse.ArgumentParser, path: str) -> None:
    """A usage error, before anything is computed, where ``--plot`` cannot be drawn: no
    matplotlib, or a file extension it cannot write."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        ap.error('--plot needs matplotlib: pip install -e ".[perf]"')
    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        ap.error(f"--plot {path}: the file's extension names the picture's format, one of {', '.join(sorted(formats))}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritondeconv.explain", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel-size", "--kernel", type=int, nargs="+", required=True, dest="kernel_size",
                    help="the weight's size (one value, or one per axis; --kernel is the older spelling)")
    ap.add_argument("--stride", type=int, nargs="+", default=[1])
    ap.add_argument("--padding", type=int, nargs="+", default=[0])
    ap.add_argument("--dilation", type=int, nargs="+", default=[1])
    ap.add_argument("--output-padding", type=int, nargs="+", default=[0])
    ap.add_argument("--input-size", type=int, nargs="+", default=[8], help="input size (one value, or one per axis)")
    ap.add_argument("--rank", type=int, choices=(1, 2, 3),
                    help="spatial dimensions (default: the most values any size argument has, at least 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--out-channels", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--plot", metavar="FILE.png", help="also draw the decomposition (2-D) to this file")
    a = ap.parse_args(argv)
    given = {"input_size": a.input_size, "kernel_size": a.kernel_size, "stride": a.stride, "padding": a.padding,
             "dilation": a.dilation, "output_padding": a.output_padding}
    rank = a.rank or max(2, *(len(v) for v in given.values()))
    if rank > 3:
        ap.error(f"a transposed convolution has 1, 2 or 3 spatial axes, but a size argument has {rank} values")
    if a.plot:
        _check_plot_file(ap, a.plot)
    try:
        geometry = {name: _per_axis(values, rank, "--" + name.replace("_", "-")) for name, values in given.items()}
        _check_as_the_op_does(rank, a, geometry)
        p = plan(**geometry)
    except (ValueError, RuntimeError, TypeError) as e:
        ap.error(str(e).splitlines()[0])
    if a.plot and rank != 2:
        ap.error(f"--plot draws 2-D geometries; this one is {rank}-D")
    print(describe(p, a.batch, a.in_channels, a.out_channels, a.groups))
    if a.plot:
        try:
            draw(p, a.plot, a.batch, a.in_channels, a.out_channels, a.groups)
        except OSError as e:
            ap.error(f"--plot cannot write {a.plot}: {e.strerror or e}")
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
