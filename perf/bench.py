"""Benchmark tritondeconv against the naive zero-insertion op, cuDNN and a torch-level
sub-pixel rewrite, over the suite of real layers (issue 3).

    python perf/bench.py                      # on a GPU: the whole suite
    python perf/bench.py --quick              # a smoke run of the harness (tiny shapes; CPU ok)

Every method's result is checked against float64 before it is timed; times are the
median of ``triton.testing.do_bench`` (on CPU, in ``--quick``, a wall-clock median).
The same run measures the matmul peak per dtype and the copy bandwidth, which give each
cell its roofline.  Writes ``bench.csv`` and ``bench.md`` to
``perf/results/<gpu-name>/`` (or ``--out``); ``perf/plot.py`` draws them.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Only the interpreter can run the kernels without a GPU; it must be chosen before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import tritondeconv  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error against float64 a result must meet before it is timed (TF32 for fp32).
CHECK_TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-3}


@dataclass(frozen=True)
class Cell:
    """One suite layer: (N, C_in, H, W) -> C_out, kernel k, stride s, padding p, output_padding."""

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    k: int
    s: int
    p: int = 0
    op: int = 0

    @property
    def label(self) -> str:
        tail = f" op{self.op}" if self.op else ""
        return f"{self.name} {self.n}x{self.c_in}x{self.h}x{self.w}->{self.c_out} k{self.k} s{self.s} p{self.p}{tail}"


SUITE = [
    Cell("DCGAN", 128, 512, 4, 4, 256, 4, 2, 1),
    Cell("DCGAN", 128, 256, 8, 8, 128, 4, 2, 1),
    Cell("DCGAN", 128, 128, 16, 16, 64, 4, 2, 1),
    Cell("DCGAN-RGB", 128, 64, 32, 32, 3, 4, 2, 1),
    Cell("U-Net", 16, 1024, 32, 32, 512, 2, 2),
    Cell("U-Net", 16, 256, 128, 128, 128, 2, 2),
    Cell("U-Net", 16, 128, 256, 256, 64, 2, 2),
    Cell("generic", 32, 256, 64, 64, 128, 3, 2, 1, 1),
    Cell("large", 8, 512, 128, 128, 256, 4, 2, 1),
    Cell("FCN", 1, 21, 64, 64, 21, 16, 8, 4),
    Cell("segmentation", 8, 64, 128, 128, 32, 4, 2, 1),
]
QUICK_SUITE = [Cell("quick", 2, 8, 5, 5, 4, 4, 2, 1), Cell("quick-op", 1, 4, 4, 3, 3, 3, 2, 1, 1)]


def subpixel_weight(w: torch.Tensor, s: int) -> torch.Tensor:
    """For k % s == 0: the conv2d weight ``V[(co, rh, rw), ci, th, tw] = W[ci, co, (m-1-th)*s + rh,
    (m-1-tw)*s + rw]`` (m = k/s) such that ``pixel_shuffle(conv2d(x, V, padding=m-1), s)`` is
    the transposed convolution before its padding is cropped."""
    c_in, c_out, k, _ = w.shape
    m = k // s
    v = w.reshape(c_in, c_out, m, s, m, s).flip(2, 4)  # [ci, co, th, rh, tw, rw]
    return v.permute(1, 3, 5, 0, 2, 4).reshape(c_out * s * s, c_in, m, m).contiguous()


def subpixel_conv_transpose2d(x, v, b, cell: Cell, h_out: int, w_out: int):
    """The torch-level sub-pixel rewrite: one conv2d with s²·C_out channels, pixel_shuffle, crop."""
    m = cell.k // cell.s
    y = F.pixel_shuffle(F.conv2d(x, v, None, padding=m - 1), cell.s)[..., cell.p: cell.p + h_out, cell.p: cell.p + w_out]
    return y if b is None else y + b[:, None, None]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def timer(fn) -> float:
    """Median milliseconds of ``fn``: do_bench on a GPU, a wall clock on the CPU."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_peaks(device: str, quick: bool) -> tuple[dict[str, float], float]:
    """Matmul peak (TFLOP/s, per dtype) and copy bandwidth (GB/s), measured now."""
    n = 256 if quick else 8192
    peaks = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        peaks[name] = 2 * n**3 / (timer(lambda: a @ b) * 1e-3) / 1e12
    src = torch.empty((2**18 if quick else 2**30) // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9
    return peaks, bandwidth


def run_cell(cell: Cell, dtype_name: str, layout: str, pass_: str, device: str) -> list[dict]:
    """Check, then time, every applicable method on one cell; returns one row per method."""
    dtype = DTYPES[dtype_name]
    x = torch.randn(cell.n, cell.c_in, cell.h, cell.w, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cell.c_in, cell.c_out, cell.k, cell.k, device=device, dtype=dtype) / math.sqrt(cell.c_in * cell.k)).to(dtype)
    b = torch.randn(cell.c_out, device=device, dtype=dtype)
    args = (cell.s, cell.p, cell.op)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), *args)
    h_out, w_out = ref.shape[-2:]

    methods = {
        "tritondeconv": lambda x, w: tritondeconv.conv_transpose2d(x, w, b, *args),
        "cudnn": lambda x, w: F.conv_transpose2d(x, w, b, *args),
    }
    if pass_ == "fwd":
        methods["naive"] = lambda x, w: tritondeconv.naive_conv_transpose2d(x, w, b, *args)
        if cell.k % cell.s == 0 and cell.op == 0:
            v = subpixel_weight(w, cell.s)  # rearranged once, as a layer would keep it
            methods["subpixel_torch"] = lambda x, w: subpixel_conv_transpose2d(x, v, b, cell, h_out, w_out)

    grad_y = torch.randn_like(ref).to(dtype)
    rows = []
    for method, fn in methods.items():
        out = fn(x, w)
        err = relative_error(out, ref)
        if not err <= CHECK_TOLERANCE[dtype_name]:
            raise RuntimeError(f"{method} on {cell.label} {dtype_name} {layout}: relative error {err:.2e}")
        if pass_ == "fwd":
            ms = timer(lambda: fn(x, w))
        else:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            ms = timer(lambda: torch.autograd.grad(fn(xg, wg), (xg, wg), grad_y))
        rows.append(dict(method=method, median_ms=ms, rel_error=err))
    return rows


def roofline(cell: Cell, dtype_name: str, pass_: str) -> tuple[float, float]:
    """Useful FLOPs and minimum bytes of one cell (backward: grad_input and grad_weight
    each redo the forward's multiply-adds and read/write the same tensors once more)."""
    plan = tritondeconv.plan((cell.h, cell.w), (cell.k,) * 2, (cell.s,) * 2, (cell.p,) * 2, (1, 1), (cell.op,) * 2)
    macs = plan.macs(cell.n, cell.c_in, cell.c_out)["useful"]
    h_out, w_out = plan.output_shape
    elements = cell.n * cell.c_in * cell.h * cell.w + cell.c_in * cell.c_out * cell.k**2 + cell.n * cell.c_out * h_out * w_out
    factor = 1 if pass_ == "fwd" else 3
    return 2.0 * macs * factor, elements * DTYPES[dtype_name].itemsize * factor


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu-interpreter-{platform.machine()}"


def write_markdown(path: Path, rows: list[dict], header: str) -> None:
    """One line per (cell, dtype, layout, pass): times, speedups, roofline; geometric means."""
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["shape"], r["dtype"], r["layout"], r["pass"]), {})[r["method"]] = r
    lines = [header, "", "| shape | dtype | layout | pass | tritondeconv ms | cuDNN ms | naive ms | subpixel ms "
             "| × cuDNN | × naive | × subpixel | % roofline |", "|" + " --- |" * 12]
    speedups: dict[tuple[str, str], list[float]] = {}
    for (shape, dtype, layout, pass_), m in keyed.items():
        ours = m["tritondeconv"]["median_ms"]

        def cell(method):
            return f"{m[method]['median_ms']:.3f}" if method in m else "–"

        def ratio(method):
            if method not in m:
                return "–"
            speedups.setdefault((pass_, method), []).append(m[method]["median_ms"] / ours)
            return f"{m[method]['median_ms'] / ours:.2f}"

        lines.append(f"| {shape} | {dtype} | {layout} | {pass_} | {ours:.3f} | {cell('cudnn')} | {cell('naive')} "
                     f"| {cell('subpixel_torch')} | {ratio('cudnn')} | {ratio('naive')} | {ratio('subpixel_torch')} "
                     f"| {m['tritondeconv']['pct_roofline']:.0f} |")
    lines += ["", "Geometric-mean speedup of tritondeconv (time of the other method / ours):", ""]
    for (pass_, method), values in sorted(speedups.items()):
        geo = math.exp(sum(map(math.log, values)) / len(values))
        lines.append(f"- {pass_}, over {method}: **{geo:.2f}×** ({len(values)} cells, worst {min(values):.2f}×)")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one dtype: a smoke run of the harness")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--out", type=Path, help="results folder (default perf/results/<gpu-name>)")
    a = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    suite = QUICK_SUITE if a.quick else SUITE
    dtypes = ["fp32"] if a.quick else a.dtypes.split(",")
    layouts, passes = a.layouts.split(","), a.passes.split(",")
    name = gpu_name(device)
    out_dir = a.out or Path(__file__).parent / "results" / name.replace(" ", "_")
    out_dir.mkdir(parents=True, exist_ok=True)

    peaks, bandwidth = measure_peaks(device, a.quick)
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device == "cuda":
        versions += f", cuDNN {torch.backends.cudnn.version()}"
    print(f"{name}: {versions}; matmul peak " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items())
          + f"; copy {bandwidth:.0f} GB/s", flush=True)

    jobs = [(c, d, l, p) for p in passes for c in suite for d in dtypes for l in layouts]
    rows = []
    for i, (cell, dtype_name, layout, pass_) in enumerate(jobs, 1):
        flops, nbytes = roofline(cell, dtype_name, pass_)
        bound_ms = max(flops / (peaks[dtype_name] * 1e12), nbytes / (bandwidth * 1e9)) * 1e3
        for r in run_cell(cell, dtype_name, layout, pass_, device):
            r.update(gpu=name, shape=cell.label, dtype=dtype_name, layout=layout, **{"pass": pass_},
                     tflops=flops / (r["median_ms"] * 1e-3) / 1e12, gbps=nbytes / (r["median_ms"] * 1e-3) / 1e9,
                     pct_roofline=100 * bound_ms / r["median_ms"], versions=versions,
                     peak_tflops=peaks[dtype_name], copy_gbps=bandwidth)
            rows.append(r)
        summary = ", ".join(f"{r['method']} {r['median_ms']:.3f} ms" for r in rows if r["shape"] == cell.label
                            and r["dtype"] == dtype_name and r["layout"] == layout and r["pass"] == pass_)
        print(f"[{i}/{len(jobs)}] {cell.label} {dtype_name} {layout} {pass_}: {summary}", flush=True)

    columns = ["gpu", "shape", "dtype", "layout", "pass", "method", "median_ms", "tflops", "gbps", "pct_roofline",
               "rel_error", "peak_tflops", "copy_gbps", "versions"]
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)
    header = (f"# tritondeconv benchmark on {name}\n\n{versions}. Measured in the same run: matmul peak "
              + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items()) + f"; copy bandwidth {bandwidth:.0f} GB/s.")
    write_markdown(out_dir / "bench.md", rows, header)
    print(f"wrote {out_dir / 'bench.csv'} and {out_dir / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
