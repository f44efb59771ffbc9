"""Draw the benchmark's CSV for a reader: our speedup over cuDNN and over the naive
zero-insertion op per shape, and a roofline.

    python perf/plot.py [perf/results/<gpu-name>/bench.csv ...]

Writes ``speedup_cudnn.png``, ``speedup_naive.png`` (when the CSV has naive rows) and
``roofline.png`` beside each CSV (default: every ``perf/results/*/bench.csv``).
Speedups are on a log axis with 1x marked; each dtype has one colour in every figure;
a panel is drawn only for a (pass, layout) the CSV holds, with only its own shapes;
titles name the GPU, the library versions and the CSV's date.  The naive-vs-ours panel
is the one comparison that also means something on a CPU (both run the same kernel in
the interpreter, one on zero-inserted input).
"""
from __future__ import annotations

import csv
import datetime
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

DTYPE_COLOURS = {"bf16": "tab:blue", "fp16": "tab:orange", "fp32": "tab:green"}
NUMBERS = ("median_ms", "tflops", "gbps", "pct_roofline", "peak_tflops", "copy_gbps")


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in NUMBERS:
            r[key] = float(r[key])
    return rows


def _colour(dtype: str) -> str:
    return DTYPE_COLOURS.get(dtype, "tab:gray")


def _title(rows: list[dict], what: str, path: Path | None) -> str:
    date = rows[0].get("date") or (datetime.date.fromtimestamp(path.stat().st_mtime).isoformat() if path else "")
    return f"{what}: tritondeconv on {rows[0]['gpu']} ({rows[0]['versions']}{', ' + date if date else ''})"


def speedup_figure(rows: list[dict], baseline: str, path: Path | None = None):
    """One panel per (pass, layout) that has both our rows and ``baseline``'s: bars of
    the baseline's time / ours per shape (only the panel's shapes), one colour per dtype,
    on a log axis with 1x marked.  ``None`` when no panel has both."""
    times = {(r["shape"], r["dtype"], r["layout"], r["pass"], r["method"]): r["median_ms"] for r in rows}
    pairs = [(r["pass"], r["layout"], r["shape"], r["dtype"]) for r in rows if r["method"] == "tritondeconv"
             and (r["shape"], r["dtype"], r["layout"], r["pass"], baseline) in times]
    panels = list(dict.fromkeys((p, lay) for p, lay, _, _ in pairs))
    if not panels:
        return None
    dtypes = list(dict.fromkeys(d for *_, d in pairs))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.8 * len(panels)), squeeze=False)
    width = 0.8 / len(dtypes)
    for ax, (pass_, layout) in zip(axes[:, 0], panels):
        shapes = list(dict.fromkeys(s for p, lay, s, _ in pairs if (p, lay) == (pass_, layout)))
        for i, dtype in enumerate(dtypes):
            xs, values = [], []
            for j, shape in enumerate(shapes):
                key = (shape, dtype, layout, pass_)
                if (*key, "tritondeconv") in times and (*key, baseline) in times:
                    xs.append(j + i * width)
                    values.append(times[(*key, baseline)] / times[(*key, "tritondeconv")])
            ax.bar(xs, values, width, label=dtype, color=_colour(dtype))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:g}"[0] in "25" else ""))
        ax.axhline(1.0, color="black", linewidth=1)
        ax.annotate("1x", (1.0, 1.0), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
        ax.set_title(f"{pass_}, {layout}: speedup over {baseline} (above 1x: ours faster)")
        ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([s.split(" k")[0] for s in shapes], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{baseline} time / ours")
        ax.legend(fontsize=8, title="dtype", title_fontsize=8)
    fig.suptitle(_title(rows, f"speedup over {baseline}", path))
    fig.tight_layout()
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


def main(argv: list[str]) -> int:
    default = Path(__file__).parent / "results"
    paths = [Path(p) for p in argv] or sorted(default.glob("*/bench.csv"))
    if not paths:
        print(f"plot: no bench.csv under {default}/*/; run python perf/bench.py on a GPU "
              "(or python perf/bench.py --quick on a CPU) first, or name a CSV")
        return 1
    for path in paths:
        if not path.exists():
            print(f"plot: {path} does not exist; python perf/bench.py writes one")
            return 1
        rows = load(path)
        written = []
        for baseline, name in (("cudnn", "speedup_cudnn.png"), ("naive", "speedup_naive.png")):
            fig = speedup_figure(rows, baseline, path)
            if fig is not None:
                _save(fig, path.parent / name)
                written.append(name)
        _save(roofline_figure(rows, path), path.parent / "roofline.png")
        written.append("roofline.png")
        print(f"wrote {', '.join(str(path.parent / n) for n in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
