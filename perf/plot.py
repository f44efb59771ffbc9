"""Draw the benchmark's CSV: speedup over cuDNN per shape and dtype, and a roofline.

    python perf/plot.py [perf/results/<gpu-name>/bench.csv]

Writes ``speedup_cudnn.png`` and ``roofline.png`` beside the CSV (default: every
``perf/results/*/bench.csv``).
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("median_ms", "tflops", "gbps", "pct_roofline", "peak_tflops", "copy_gbps"):
            r[key] = float(r[key])
    return rows


def plot_speedups(rows: list[dict], path: Path) -> None:
    """One panel per (pass, layout): bars of cuDNN's time / ours per shape, one per dtype."""
    times = {(r["shape"], r["dtype"], r["layout"], r["pass"], r["method"]): r["median_ms"] for r in rows}
    panels = sorted({(r["pass"], r["layout"]) for r in rows})
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    width = 0.8 / len(dtypes)
    for ax, (pass_, layout) in zip(axes[:, 0], panels):
        for i, dtype in enumerate(dtypes):
            values = [times.get((s, dtype, layout, pass_, "cudnn"), float("nan"))
                      / times.get((s, dtype, layout, pass_, "tritondeconv"), float("nan")) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=dtype)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{pass_}, {layout}: speedup over cuDNN (higher is better)")
        ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([s.split(" k")[0] for s in shapes], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("cuDNN time / ours")
        ax.legend(fontsize=8)
    fig.suptitle(f"tritondeconv on {rows[0]['gpu']} ({rows[0]['versions']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roofline(rows: list[dict], path: Path) -> None:
    """Achieved TFLOP/s against arithmetic intensity, under each dtype's measured roofs."""
    fig, ax = plt.subplots(figsize=(9, 6))
    groups = defaultdict(list)
    for r in rows:
        if r["pass"] == "fwd" and r["method"] in ("tritondeconv", "cudnn"):
            groups[(r["method"], r["dtype"])].append((r["tflops"] * 1e3 / r["gbps"], r["tflops"]))
    bandwidth = rows[0]["copy_gbps"] * 1e9
    intensities = [x for pts in groups.values() for x, _ in pts]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    for dtype, peak in sorted({(r["dtype"], r["peak_tflops"]) for r in rows}):
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(xs, [min(peak, x * bandwidth / 1e12) for x in xs], linewidth=1, label=f"roof {dtype}")
    for (method, dtype), pts in sorted(groups.items()):
        ax.scatter([x for x, _ in pts], [y for _, y in pts], marker="o" if method == "tritondeconv" else "x",
                   label=f"{method} {dtype}", s=24)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (useful FLOP / minimum byte)")
    ax.set_ylabel("achieved TFLOP/s (useful FLOPs)")
    ax.set_title(f"forward roofline on {rows[0]['gpu']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(Path(__file__).parent.glob("results/*/bench.csv"))
    for path in paths:
        rows = load(path)
        plot_speedups(rows, path.parent / "speedup_cudnn.png")
        plot_roofline(rows, path.parent / "roofline.png")
        print(f"wrote {path.parent / 'speedup_cudnn.png'} and {path.parent / 'roofline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
