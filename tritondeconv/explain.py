"""Print the stride-phase decomposition of a transposed convolution.

    python -m tritondeconv.explain --kernel 3 --stride 2 --padding 1

Each size argument takes one int (both axes) or two (height, width).
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
    return "\n".join(lines)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
