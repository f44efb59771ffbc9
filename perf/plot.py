"""Draw the benchmark's CSV for a reader: our speedup over cuDNN and over the naive
zero-insertion op per layer, and a roofline.

    python perf/plot.py [perf/results/<gpu-name>/bench.csv ...] [--out DIR] [--no-summary]

Writes beside each CSV (default: every ``perf/results/*/bench.csv``):

* ``summary.png``: forward and training (forward+backward), each over cuDNN and over
  the naive op, one bar per layer, the figure the README shows;
* ``speedup_cudnn.png``, ``speedup_naive.png``: one panel per (pass, layout) the CSV
  holds, with only that panel's layers;
* ``roofline.png``: the forward's achieved TFLOP/s under each dtype's measured roof.

A speedup is the baseline's time over ours, from the CSV's ``median_ms`` (on a GPU the
median of ``triton.testing.do_bench``, on a CPU a wall clock's).  Speedups are on a
log-2 axis labelled 0.25×, 0.5×, 1×, 2×, 4× (further powers of two where the data
reach them), with 1× marked: a bar rises from 1× where ours is faster and hangs from it,
faded, where ours is slower.  Each dtype has one colour in every figure; in the summary
an NCHW bar is hatched.  Titles name the GPU, the library versions and the CSV's date; a
CSV from the CPU interpreter says it is a smoke run, not a speed measurement.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

DTYPE_COLOURS = {"bf16": "tab:blue", "fp16": "tab:orange", "fp32": "tab:green"}
LAYOUT_HATCHES = {"channels_last": "", "nchw": "///"}
LOSS_ALPHA = 0.45
NUMBERS = ("median_ms", "tflops", "gbps", "pct_roofline", "peak_tflops", "copy_gbps")
COLUMNS = ("gpu", "shape", "dtype", "layout", "pass", "method", "versions") + NUMBERS
SUMMARY_PASSES = (("fwd", "forward"), ("fwd+bwd", "training (forward+backward)"))
SUMMARY_BASELINES = ("cudnn", "naive")
RESULTS = Path(__file__).parent / "results"
SHAPE = re.compile(r"(?P<name>\S+) (?P<dims>\d+(?:x\d+)+)->(?P<c_out>\d+) k(?P<k>\d+) s(?P<s>\d+) p\d+(?: op\d+)?$")
POWERS = {1: "", 2: "²", 3: "³"}


def load(path: Path) -> list[dict]:
    """The rows of a ``bench.csv``, its numeric columns as floats.  Raises ``OSError``
    when the file cannot be read and ``ValueError`` when it is not a benchmark CSV."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"not a bench.csv (no column {', '.join(missing)})")
        rows = list(reader)
    if not rows:
        raise ValueError("has a header and no rows")
    for r in rows:
        for key in NUMBERS:
            r[key] = float(r[key]) if r[key] else math.nan
    return rows


def _colour(dtype: str) -> str:
    return DTYPE_COLOURS.get(dtype, "tab:gray")


def is_smoke(rows: list[dict]) -> bool:
    """Whether the CSV comes from the CPU interpreter (a smoke run of the harness)."""
    return rows[0]["gpu"].startswith("cpu-interpreter-")


def time_label(rows: list[dict]) -> str:
    """Which time ``median_ms`` holds, as the axis labels say it."""
    return "wall-clock median, interpreter" if is_smoke(rows) else "do_bench median"


def baseline_label(rows: list[dict], baseline: str) -> str:
    """The baseline's name for a reader: the ``cudnn`` method is aten's CPU
    convolution in a run without a GPU."""
    if baseline == "cudnn":
        return "aten (CPU)" if is_smoke(rows) else "cuDNN"
    return {"naive": "naive op"}.get(baseline, baseline)


def layer_label(shape: str) -> str:
    """A layer's short name from the CSV's shape string, on two lines: ``DCGAN
    128x128x16x16->64 k4 s2 p1`` reads ``DCGAN 128→64`` over ``16² k4s2`` (batch and
    padding left out; a 3-D input of 16x32x32 reads ``16×32²``); a string of another form
    is kept as it is."""
    m = SHAPE.match(shape)
    if not m:
        return shape
    _, c_in, *spatial = m["dims"].split("x")
    equal = 1
    while equal < len(spatial) and spatial[-1 - equal] == spatial[-1]:
        equal += 1
    size = "×".join(spatial[:len(spatial) - equal] + [spatial[-1] + POWERS.get(equal, "")])
    return f"{m['name']} {c_in}→{m['c_out']}\n{size} k{m['k']}s{m['s']}"


def ratio_label(value: float, _position=None) -> str:
    """A speedup tick's label: ``0.5×``, ``1×``, ``2×``; below 1/8 as a fraction."""
    if value >= 0.125:
        return f"{value:g}×"
    return f"1/{1 / value:.0f}×"


def ratio_text(value: float) -> str:
    """A measured speedup as text: two decimals, or a fraction below 0.01."""
    return f"{value:.2f}×" if value >= 0.01 else f"1/{1 / value:.0f}×"


def ratio_ticks(values: list[float]) -> list[float]:
    """Powers of two from the smallest value's to the largest's, never fewer than
    0.25× to 4×; every second (third, ...) power, 1× kept, when they would be more than
    eleven."""
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    lo = min([-2] + [math.floor(math.log2(v)) for v in finite])
    hi = max([2] + [math.ceil(math.log2(v)) for v in finite])
    step = math.ceil((hi - lo) / 10)
    return [2.0**e for e in range(lo, hi + 1) if e % step == 0]


def speedup_axis(ax, values: list[float], ylabel: str, room: float = 0.04) -> None:
    """Make ``ax`` a speedup axis for ``values``: log 2, ticks labelled as ratios, the 1×
    line drawn; ``room``, a fraction of the axis, left free beyond the outermost tick
    or value at each end."""
    ticks = ratio_ticks(values)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(ratio_label))
    ax.yaxis.set_minor_locator(NullLocator())
    lo, hi = math.log2(min(ticks + values)), math.log2(max(ticks + values))
    pad = room * (hi - lo) / (1 - 2 * room)
    ax.set_ylim(2 ** (lo - pad), 2 ** (hi + pad))
    ax.grid(axis="y", color="0.88", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.axhline(1.0, color="black", linewidth=1.2)
    ax.set_ylabel(ylabel)


def _bar(ax, x: float, value: float, width: float, dtype: str, hatch: str = "", annotate: bool = False) -> None:
    """One speedup bar from 1× to ``value``: rising where ours is faster, hanging and
    faded where it is slower; with ``annotate``, its value written past its end."""
    ax.bar(x, value - 1.0, width, bottom=1.0, color=_colour(dtype), alpha=1.0 if value >= 1 else LOSS_ALPHA,
           hatch=hatch, edgecolor="black" if hatch else "none", linewidth=0.4 if hatch else 0)
    if annotate:
        ax.annotate(ratio_text(value), (x, value), xytext=(0, 2 if value >= 1 else -2), textcoords="offset points",
                    rotation=90, ha="center", va="bottom" if value >= 1 else "top", fontsize=6.5, color="0.2")


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _times(rows: list[dict]) -> dict:
    return {(r["shape"], r["dtype"], r["layout"], r["pass"], r["method"]): r["median_ms"] for r in rows}


def speedups(rows: list[dict], pass_: str, baseline: str) -> dict:
    """``{(shape, dtype, layout): baseline's time / ours}`` over the cells of ``pass_``
    where both were timed, in the CSV's order."""
    times = _times(rows)
    out = {}
    for r in rows:
        key = (r["shape"], r["dtype"], r["layout"])
        ours = times.get((*key, pass_, "tritondeconv"))
        theirs = times.get((*key, pass_, baseline))
        if r["pass"] == pass_ and r["method"] == "tritondeconv" and _positive(ours) and _positive(theirs):
            out[key] = theirs / ours
    return out


def _title(rows: list[dict], what: str, path: Path | None) -> str:
    date = rows[0].get("date") or (datetime.date.fromtimestamp(path.stat().st_mtime).isoformat() if path else "")
    title = f"{what}: tritondeconv on {rows[0]['gpu']} ({rows[0]['versions']}{', ' + date if date else ''})"
    if is_smoke(rows):
        title = "CPU interpreter smoke run, not a speed measurement\n" + title
    return title


def _source(path: Path | None) -> str:
    """How a caption names the CSV: relative to the working directory when inside it."""
    if path is None:
        return "the rows given"
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def speedup_figure(rows: list[dict], baseline: str, path: Path | None = None):
    """One panel per (pass, layout) that has both our rows and ``baseline``'s: bars of
    the baseline's time / ours per layer (only the panel's layers), one colour per dtype,
    on a speedup axis.  ``None`` when no panel has both."""
    panels = list(dict.fromkeys((r["pass"], r["layout"]) for r in rows if r["method"] == "tritondeconv"))
    cells = {(p, lay): {k: v for k, v in speedups(rows, p, baseline).items() if k[2] == lay} for p, lay in panels}
    panels = [p for p in panels if cells[p]]
    if not panels:
        return None
    values = [v for p in panels for v in cells[p].values()]
    dtypes = list(dict.fromkeys(d for p in panels for _, d, _ in cells[p]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.6 * len(panels)), squeeze=False)
    width = 0.8 / len(dtypes)
    name = baseline_label(rows, baseline)
    for ax, (pass_, layout) in zip(axes[:, 0], panels):
        shapes = list(dict.fromkeys(s for s, _, _ in cells[(pass_, layout)]))
        for j, shape in enumerate(shapes):
            for i, dtype in enumerate(dtypes):
                if (shape, dtype, layout) in cells[(pass_, layout)]:
                    _bar(ax, j + i * width, cells[(pass_, layout)][(shape, dtype, layout)], width, dtype)
        speedup_axis(ax, values, f"speedup over {name}\n({time_label(rows)})")
        ax.set_title(f"{pass_}, {layout}: speedup over {name} (above 1×: ours faster; faded, below: slower)")
        ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([layer_label(s) for s in shapes], rotation=90 if len(shapes) > 8 else 0, fontsize=8,
                           linespacing=1.0)
        ax.legend(handles=[Patch(color=_colour(d), label=d) for d in dtypes], fontsize=8, title="dtype",
                  title_fontsize=8)
    fig.suptitle(_title(rows, f"speedup over {name}", path))
    fig.tight_layout()
    return fig


def summary_figure(rows: list[dict], path: Path | None = None):
    """The one figure per GPU a reader looks at: rows forward and training
    (forward+backward), columns over cuDNN and over the naive op, one bar per layer and
    (dtype, layout) in the CSV's order with its value written on it, each dtype its
    colour, NCHW hatched; a panel the CSV has no cells for says so.  The panels of a
    column share their speedup axis."""
    grid = {(p, b): speedups(rows, p, b) for p, _ in SUMMARY_PASSES for b in SUMMARY_BASELINES}
    layers = {key: list(dict.fromkeys(shape for shape, _, _ in cells)) for key, cells in grid.items()}
    widths = [max([len(layers[(p, b)]) for p, _ in SUMMARY_PASSES] + [3]) for b in SUMMARY_BASELINES]
    fig, axes = plt.subplots(len(SUMMARY_PASSES), len(SUMMARY_BASELINES), figsize=(12, 7.6), squeeze=False,
                             width_ratios=widths, layout="constrained")
    time = time_label(rows)
    for i, (pass_, pass_name) in enumerate(SUMMARY_PASSES):
        for j, baseline in enumerate(SUMMARY_BASELINES):
            ax, cells = axes[i, j], grid[(pass_, baseline)]
            name = baseline_label(rows, baseline)
            if not cells:
                ax.set_title(f"{pass_name} over {name}", fontsize=9.5)
                ax.text(0.5, 0.5, f"no {pass_} cells with the {name}\nin this CSV", ha="center", va="center",
                        fontsize=9, color="0.35", transform=ax.transAxes)
                ax.set_xticks([]), ax.set_yticks([])
                continue
            width = 0.8 / max(max(Counter(k[0] for k in grid[(p, baseline)]).values(), default=1)
                              for p, _ in SUMMARY_PASSES)
            for x, shape in enumerate(layers[(pass_, baseline)]):
                mine = [k for k in cells if k[0] == shape]
                for n, key in enumerate(mine):
                    _bar(ax, x + (n - (len(mine) - 1) / 2) * width, cells[key], width, key[1],
                         LAYOUT_HATCHES.get(key[2], "xx"), annotate=True)
            column = [v for p, _ in SUMMARY_PASSES for v in grid[(p, baseline)].values()]
            speedup_axis(ax, column, f"speedup over {name}\n({time})", room=0.17)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_xticks(range(len(layers[(pass_, baseline)])))
            ax.set_xticklabels([layer_label(s) for s in layers[(pass_, baseline)]], rotation=90, fontsize=7.5,
                               linespacing=1.0)
            ax.set_xlim(-0.6, len(layers[(pass_, baseline)]) - 0.4)
            ax.set_title(f"{pass_name} over {name}: {len(cells)} cells, geometric mean "
                         f"{ratio_text(_geomean(list(cells.values())))}", fontsize=9.5)
    present = [k for cells in grid.values() for k in cells]
    handles = [Patch(color=_colour(d), label=d) for d in dict.fromkeys(k[1] for k in present)]
    handles += [Patch(facecolor="white", edgecolor="black", linewidth=0.4, hatch=hatch, label=layout)
                for layout, hatch in LAYOUT_HATCHES.items() if any(k[2] == layout for k in present)]
    handles.append(Patch(color="0.3", alpha=LOSS_ALPHA, label="below 1×: tritondeconv slower"))
    top = 0.87 if is_smoke(rows) else 0.9
    fig.get_layout_engine().set(rect=(0, 0.025, 1, top - 0.025))
    fig.text(0.5, 0.995, _title(rows, "speedup per layer", path), ha="center", va="top", fontsize=11)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, top), ncol=len(handles), fontsize=8.5,
               frameon=False)
    fig.text(0.5, 0.005, f"source: {_source(path)}; each bar: the baseline's time / tritondeconv's ({time}); "
             "batch and padding in the CSV's shape column", ha="center", va="bottom", fontsize=7.5, color="0.3")
    return fig


def roofline_figure(rows: list[dict], path: Path | None = None):
    """Achieved TFLOP/s against arithmetic intensity of the forward, ours (o) and
    cuDNN's (x), under each dtype's measured roof, in that dtype's colour."""
    fig, ax = plt.subplots(figsize=(9, 6))
    groups = defaultdict(list)
    for r in rows:
        if r["pass"] == "fwd" and r["method"] in ("tritondeconv", "cudnn") and r["gbps"] > 0:
            groups[(r["method"], r["dtype"])].append((r["tflops"] * 1e3 / r["gbps"], r["tflops"]))
    bandwidth = rows[0]["copy_gbps"] * 1e9
    intensities = [x for pts in groups.values() for x, _ in pts] or [1.0]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    for dtype, peak in sorted({(r["dtype"], r["peak_tflops"]) for r in rows}):
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(xs, [min(peak, x * bandwidth / 1e12) for x in xs], linewidth=1, color=_colour(dtype),
                label=f"roof {dtype}")
    for (method, dtype), pts in sorted(groups.items()):
        ax.scatter([x for x, _ in pts], [y for _, y in pts], marker="o" if method == "tritondeconv" else "x",
                   color=_colour(dtype), label=f"{method} {dtype}", s=24)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (useful FLOP / minimum byte)")
    ax.set_ylabel("achieved TFLOP/s (useful FLOPs)")
    ax.set_title(_title(rows, "forward roofline", path), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line: CSV paths, ``--out`` and ``--summary``/``--no-summary``."""
    p = argparse.ArgumentParser(prog="perf/plot.py", description=__doc__.split("\n\n")[0],
                                epilog="Run python perf/bench.py on a GPU (or python perf/bench.py --quick on a "
                                       "CPU) to write a bench.csv.")
    p.add_argument("csv", nargs="*", type=Path,
                   help=f"benchmark CSVs to draw (default: every {RESULTS}/*/bench.csv)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder for the figures (default: beside each CSV); only with one CSV")
    p.add_argument("--summary", action=argparse.BooleanOptionalAction, default=True,
                   help="also write summary.png, the forward and training speedups in one figure (default: yes)")
    return p


def main(argv: list[str]) -> int:
    """Draw every CSV named (or found); a CSV that cannot be read is a usage error."""
    args_parser = parser()
    args = args_parser.parse_args(argv)
    paths = args.csv or sorted(RESULTS.glob("*/bench.csv"))
    if not paths:
        args_parser.error(f"no bench.csv under {RESULTS}/*/; run python perf/bench.py first, or name a CSV")
    if args.out and len(paths) > 1:
        args_parser.error(f"--out takes one CSV, not {len(paths)} (their figures would overwrite each other)")
    loaded = []
    for path in paths:
        if not path.is_file():
            args_parser.error(f"{path} does not exist; python perf/bench.py writes one")
        try:
            loaded.append((path, load(path)))
        except (OSError, ValueError, csv.Error) as error:
            args_parser.error(f"cannot read {path}: {error}")
    for path, rows in loaded:
        out = args.out or path.parent
        out.mkdir(parents=True, exist_ok=True)
        figures = [(speedup_figure(rows, "cudnn", path), "speedup_cudnn.png"),
                   (speedup_figure(rows, "naive", path), "speedup_naive.png"),
                   (roofline_figure(rows, path), "roofline.png")]
        if args.summary:
            figures.append((summary_figure(rows, path), "summary.png"))
        written = []
        for fig, name in figures:
            if fig is not None:
                _save(fig, out / name)
                written.append(str(out / name))
        print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
