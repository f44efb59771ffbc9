"""Benchmark the decoder blocks: nearest-upsample + conv folded into one
transposed convolution against ``F.interpolate`` + ``F.conv2d`` (time and peak memory),
and fused epilogues against the op followed by PyTorch's activation.

    python perf/bench_blocks.py            # on a GPU
    python perf/bench_blocks.py --quick    # a smoke run of the harness (tiny shapes; CPU ok)

Checked against float64 before timing; medians of ``triton.testing.do_bench``; peak
memory from ``torch.cuda.max_memory_allocated`` above what the inputs hold.  Writes
``blocks.csv`` (a row as soon as it is measured) and ``blocks.md`` beside ``bench.py``'s
results; ``--budget SECONDS`` stops after the block in progress.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# bench (perf/ is the script's folder) first: it picks the interpreter when there is no GPU.
from bench import DTYPES, QUICK_SUITES, SUITES, Budget, CsvSink, relative_error, setup, timer  # noqa: I001
import torch
import torch.nn.functional as F
import triton

import tritondeconv
from tritondeconv.kernels.activations import TABLE as ACTIVATION_TABLE

# (name, N, C, H=W in) -> C out, k3 p1, scale 2: the upsampling convs of a Stable-Diffusion
# VAE decoder (batch 1) and of a U-Net decoder (batch 8).
FOLD_CELLS = [
    ("VAE 512ch 64->128", 1, 512, 64, 512),
    ("VAE 512ch 128->256", 1, 512, 128, 512),
    ("VAE 256ch 256->512", 1, 256, 256, 256),
    ("U-Net 256ch 32->64", 8, 256, 32, 256),
    ("U-Net 128ch 64->128", 8, 128, 64, 128),
]
QUICK_FOLD_CELLS = [("quick 8ch 4->8", 1, 8, 4, 8)]
# Suite rows with the activation their networks put after them.
EPILOGUE_CELLS = [(cell, "relu") for cell in SUITES["2d"] if cell.name == "DCGAN"] + \
                 [(cell, "tanh") for cell in SUITES["2d"] if cell.name == "DCGAN-RGB"] + \
                 [(cell, "silu") for cell in SUITES["2d"] if cell.name == "U-Net"]
CHECK = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-3}


def peak_bytes(fn, device: str) -> float:
    """Peak memory ``fn`` allocates beyond what is allocated before it (GPU only)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def fold_rows(cell, dtype_name: str, layout: str, device: str) -> list[dict]:
    name, n, c, size, c_out = cell
    dtype = DTYPES[dtype_name]
    x = torch.randn(n, c, size, size, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c, 3, 3, device=device) / math.sqrt(9 * c)).to(dtype)
    b = torch.randn(c_out, device=device, dtype=dtype)
    ref = F.conv2d(F.interpolate(x.double(), scale_factor=2), w.double(), b.double(), padding=1)
    methods = {
        "tritondeconv_fold": lambda: tritondeconv.upsample_conv2d(x, w, b, 2, 1),
        "interpolate_conv2d": lambda: F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1),
    }
    rows = []
    for method, fn in methods.items():
        err = relative_error(fn(), ref)
        if not err <= CHECK[dtype_name]:
            raise RuntimeError(f"{method} on {name} {dtype_name} {layout}: relative error {err:.2e}")
        rows.append(dict(block="fold", shape=name, dtype=dtype_name, layout=layout, method=method,
                         median_ms=timer(fn), peak_mb=peak_bytes(fn, device) / 2**20, rel_error=err))
    return rows


def epilogue_rows(cell, activation: str, dtype_name: str, layout: str, device: str) -> list[dict]:
    dtype = DTYPES[dtype_name]
    x = torch.randn(cell.n, cell.c_in, *cell.spatial, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cell.c_in, cell.c_out, cell.k, cell.k, device=device) / math.sqrt(cell.c_in * cell.k)).to(dtype)
    b = torch.randn(cell.c_out, device=device, dtype=dtype)
    args = (cell.s, cell.p, cell.op)
    act = ACTIVATION_TABLE[activation].torch
    ref = act(F.conv_transpose2d(x.double(), w.double(), b.double(), *args), 0.01)
    methods = {
        "fused": lambda: tritondeconv.conv_transpose2d(x, w, b, *args, activation=activation),
        "unfused": lambda: act(tritondeconv.conv_transpose2d(x, w, b, *args), 0.01),
    }
    rows = []
    for method, fn in methods.items():
        err = relative_error(fn(), ref)
        if not err <= CHECK[dtype_name]:
            raise RuntimeError(f"{method} on {cell.label} {dtype_name} {layout}: relative error {err:.2e}")
        rows.append(dict(block=f"epilogue {activation}", shape=cell.label, dtype=dtype_name, layout=layout,
                         method=method, median_ms=timer(fn), peak_mb=peak_bytes(fn, device) / 2**20, rel_error=err))
    return rows


def write_markdown(path: Path, rows: list[dict], header: str) -> None:
    lines = [header, ""]
    for block, ours, theirs in (("fold", "tritondeconv_fold", "interpolate_conv2d"), ("epilogue", "fused", "unfused")):
        keyed: dict[tuple, dict] = {}
        for r in rows:
            if r["block"].startswith(block):
                keyed.setdefault((r["block"], r["shape"], r["dtype"], r["layout"]), {})[r["method"]] = r
        if not keyed:
            continue
        lines += [f"| block | shape | dtype | layout | {ours} ms | {theirs} ms | speedup | {ours} MB | {theirs} MB |",
                  "|" + " --- |" * 9]
        speedups = []
        for (blk, shape, dtype, layout), m in keyed.items():
            a, b = m[ours], m[theirs]
            speedups.append(b["median_ms"] / a["median_ms"])
            lines.append(f"| {blk} | {shape} | {dtype} | {layout} | {a['median_ms']:.3f} | {b['median_ms']:.3f} "
                         f"| {speedups[-1]:.2f} | {a['peak_mb']:.1f} | {b['peak_mb']:.1f} |")
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
        lines += ["", f"Geometric-mean speedup of {ours} over {theirs}: **{geo:.2f}×** ({len(speedups)} cells, "
                      f"worst {min(speedups):.2f}×)", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, fp32: a smoke run of the harness")
    ap.add_argument("--out", type=Path, help="results folder (default perf/results/<gpu-name>)")
    ap.add_argument("--budget", type=float, metavar="SECONDS", help="stop after the block in progress once spent")
    ap.add_argument("--fake-clock", type=float, metavar="SECONDS",
                    help="rehearsal: the budget counts SECONDS per finished block instead of the wall clock")
    a = ap.parse_args(argv)
    device, name, out_dir = setup(a.out, quick=a.quick)
    dtypes = ["fp32"] if a.quick else ["bf16", "fp16"]
    layouts = ["nchw", "channels_last"]
    fold_cells = QUICK_FOLD_CELLS if a.quick else FOLD_CELLS
    epilogue_cells = [(QUICK_SUITES["2d"][0], "silu")] if a.quick else EPILOGUE_CELLS

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    columns = ["gpu", "versions", "block", "shape", "dtype", "layout", "method", "median_ms", "peak_mb", "rel_error"]
    sink = CsvSink(out_dir / "blocks.csv", [], columns)
    budget = Budget(a.budget, a.fake_clock)
    jobs = [("fold", c, d, l) for c in fold_cells for d in dtypes for l in layouts] + \
           [("epilogue", c, d, l) for c in epilogue_cells for d in dtypes for l in layouts]
    for i, (kind, cell, dtype_name, layout) in enumerate(jobs, 1):
        if budget.spent():
            print(f"budget of {a.budget:g} s spent: stopped after {i - 1} of {len(jobs)} blocks", flush=True)
            break
        new = fold_rows(cell, dtype_name, layout, device) if kind == "fold" else \
            epilogue_rows(*cell, dtype_name, layout, device)
        for r in new:
            sink.write({"gpu": name, "versions": versions, **r})
        print(f"[{i}/{len(jobs)}] {new[0]['block']} {new[0]['shape']} {dtype_name} {layout}: "
              + ", ".join(f"{r['method']} {r['median_ms']:.3f} ms" for r in new), flush=True)
        budget.job_done()
    sink.close()
    rows = sink.rows
    if not rows:
        return 0
    write_markdown(out_dir / "blocks.md", rows, f"# Decoder blocks on {name}\n\n{versions}.")
    print(f"wrote {out_dir / 'blocks.csv'} and {out_dir / 'blocks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
