"""Print the stride-phase decomposition of a transposed convolution.

    python -m tritondeconv.explain --kernel 3 --stride 2 --padding 1 [--plot decomposition.png]

Each size argument takes one int (both axes) or two (height, width).  ``--plot`` draws
the decomposition (needs matplotlib: ``pip install -e ".[perf]"``).

It only plans: the phases and multiply-add counts are derived from the geometry, and no
kernel runs (``python -m tritondeconv.demo`` runs one).
"""
from __future__ import annotations

import argparse
import sys

from .planner import AxisPlan, Plan, plan


def _pair(values: list[int]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def describe_axis(name: str, axis: AxisPlan) -> list[str]:
    lines = [
        f"{name}: input {axis.size_in} -> output {axis.size_out} "
        f"(kernel {axis.kernel}, stride {axis.stride}, padding {axis.padding}, "
        f"dilation {axis.dilation}, output_padding {axis.output_padding})"
    ]
    for ph in axis.phases:
        outs = list(ph.out_indices)
        shown = ", ".join(map(str, outs[:6])) + (", ..." if len(outs) > 6 else "")
        if ph.taps:
            reads = ", ".join(f"w[{t}]*x[u-{o}]" for t, o in zip(ph.taps, ph.offsets))
        else:
            reads = "no taps: bias only"
        lines.append(f"  phase r={ph.residue}: {ph.count} outputs [{shown}]  taps {list(ph.taps)}  y[o] = {reads}")
    return lines


def describe(p: Plan, batch: int, in_channels: int, out_channels: int, groups: int) -> str:
    lines = []
    for name, axis in zip(("height", "width"), p.axes):
        lines += describe_axis(name, axis)
    phases = p.phases
    tap_counts = sorted({tuple(len(ph.taps) for ph in combo) for combo in phases})
    lines.append(
        f"{len(phases)} phases in 2-D, each a dense stride-1 convolution; taps per phase (h x w): "
        + ", ".join(f"{h}x{w}" for h, w in tap_counts)
    )
    macs = p.macs(batch, in_channels, out_channels, groups)
    lines.append(
        f"multiply-adds for N={batch}, C_in={in_channels}, C_out={out_channels}, groups={groups}: "
        f"naive zero-insertion {macs['naive']:,}; decomposed {macs['decomposed']:,}; "
        f"useful (inputs that land in the output) {macs['useful']:,}"
    )
    saved = macs["naive"] - macs["decomposed"]
    lines.append(
        f"the decomposition skips {saved:,} multiply-adds ({saved / macs['naive']:.1%} of naive), "
        f"{macs['naive'] / max(macs['decomposed'], 1):.2f}x fewer"
    )
    lines.append("counted from the plan; no kernel was run (python -m tritondeconv.demo runs one)")
    return "\n".join(lines)


def draw(p: Plan, path: str, batch: int = 1, in_channels: int = 1, out_channels: int = 1, groups: int = 1) -> None:
    """Save a picture of the decomposition of a 2-D plan to ``path``: the output grid
    coloured by phase, the kernel's taps coloured by the phase that uses them, and the
    multiply-adds of the naive and the decomposed methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    axis_h, axis_w = p.axes
    n_w = axis_w.stride
    colours = plt.get_cmap("tab10").colors
    cmap = ListedColormap([colours[i % 10] for i in range(axis_h.stride * n_w)])

    def phase_of_output(o, axis):
        return (o + axis.padding) % axis.stride

    fig, (ax_out, ax_k, ax_macs) = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.2, 1, 0.8]})

    # Output grid, each pixel coloured by its phase (r_h, r_w), labelled with its tap count.
    h_show, w_show = min(axis_h.size_out, 12), min(axis_w.size_out, 12)
    grid = [[phase_of_output(i, axis_h) * n_w + phase_of_output(j, axis_w) for j in range(w_show)] for i in range(h_show)]
    ax_out.imshow(grid, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5)
    taps_h = {ph.residue: len(ph.taps) for ph in axis_h.phases}
    taps_w = {ph.residue: len(ph.taps) for ph in axis_w.phases}
    for i in range(h_show):
        for j in range(w_show):
            t = taps_h[phase_of_output(i, axis_h)] * taps_w[phase_of_output(j, axis_w)]
            ax_out.text(j, i, str(t), ha="center", va="center", fontsize=8, color="white")
    ax_out.set_title(f"output pixels by phase (first {h_show}x{w_show});\nnumber = taps it needs")
    ax_out.set_xticks([]), ax_out.set_yticks([])

    # Kernel taps, each coloured by the phase whose sub-kernel holds it.
    k_h, k_w = axis_h.kernel, axis_w.kernel
    owner = [[((kh * axis_h.dilation) % axis_h.stride) * n_w + (kw * axis_w.dilation) % axis_w.stride
              for kw in range(k_w)] for kh in range(k_h)]
    ax_k.imshow(owner, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5)
    for kh in range(k_h):
        for kw in range(k_w):
            ax_k.text(kw, kh, f"w[{kh},{kw}]", ha="center", va="center", fontsize=8, color="white")
    ax_k.set_title(f"{k_h}x{k_w} kernel: each tap belongs to one phase's\nsub-kernel (same colour as its outputs)")
    ax_k.set_xticks([]), ax_k.set_yticks([])

    macs = p.macs(batch, in_channels, out_channels, groups)
    names = ["naive\n(zero insertion)", "decomposed\n(stride phases)", "useful"]
    values = [macs["naive"], macs["decomposed"], macs["useful"]]
    bars = ax_macs.bar(names, values, color=["0.6", colours[0], colours[2]])
    ax_macs.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    ax_macs.set_title(f"multiply-adds: {macs['naive'] / max(macs['decomposed'], 1):.2f}x fewer")
    ax_macs.set_ylabel(f"MACs (N={batch}, C_in={in_channels}, C_out={out_channels})")

    fig.suptitle(
        f"Transposed convolution, kernel {k_h}x{k_w}, stride {axis_h.stride}x{axis_w.stride}, padding "
        f"{axis_h.padding}x{axis_w.padding}, input {axis_h.size_in}x{axis_w.size_in}: "
        f"{len(p.phases)} dense stride-1 convolutions, one per output phase"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[int] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritondeconv.explain", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=int, nargs="+", required=True)
    ap.add_argument("--stride", type=int, nargs="+", default=[1])
    ap.add_argument("--padding", type=int, nargs="+", default=[0])
    ap.add_argument("--dilation", type=int, nargs="+", default=[1])
    ap.add_argument("--output-padding", type=int, nargs="+", default=[0])
    ap.add_argument("--input-size", type=int, nargs="+", default=[8], help="input height (and width)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--out-channels", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--plot", metavar="FILE.png", help="also draw the decomposition to this file")
    a = ap.parse_args(argv)
    try:
        p = plan(
            _pair(a.input_size), _pair(a.kernel), _pair(a.stride), _pair(a.padding),
            _pair(a.dilation), _pair(a.output_padding),
        )
    except ValueError as e:
        ap.error(str(e))
    if min(p.output_shape) <= 0:
        ap.error(f"output size {list(p.output_shape)} is non-positive")
    print(describe(p, a.batch, a.in_channels, a.out_channels, a.groups))
    if a.plot:
        try:
            draw(p, a.plot, a.batch, a.in_channels, a.out_channels, a.groups)
        except ImportError:
            ap.error('--plot needs matplotlib: pip install -e ".[perf]"')
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
