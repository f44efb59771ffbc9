"""Benchmark the decoder blocks: nearest-upsample + conv folded into one
transposed convolution against ``F.interpolate`` + ``F.conv2d`` (time and peak memory),
fused epilogues against the op followed by PyTorch's activation, and whole decoder
blocks (transposed convolution, batch norm, activation, and for pix2pix the skip
concatenation) fused by ``convert(model, fuse=True)`` against the same block in eager
PyTorch and, on a GPU, under ``torch.compile``.

    python perf/bench_blocks.py            # on a GPU
    python perf/bench_blocks.py --quick    # a smoke run of the harness (tiny shapes; CPU ok)
    python perf/bench_blocks.py --traffic  # the decoder blocks' passes and bytes, from shapes (no GPU)

Checked against float64 before timing; medians of ``triton.testing.do_bench``; peak
memory from ``torch.cuda.max_memory_allocated`` above what the inputs hold.  Writes
``blocks.csv`` (a row as soon as it is measured) and ``blocks.md`` beside ``bench.py``'s
results; ``--budget SECONDS`` stops after the block in progress.
"""
from __future__ import annotations

# bench (perf/ is the script's folder) first, before triton: it picks the interpreter when
# there is no GPU.
from bench import DTYPES, QUICK_SUITES, SUITES, Budget, CsvSink, relative_error, setup, timer

# isort: split
import argparse
import copy
import math
import sys
from pathlib import Path

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
# (name, N, C in, H=W in, C out, skip channels, activation): k4 s2 p1 transposed
# convolution, batch norm, activation (then the skip concatenated, where there is one).
DECODER_CELLS = [
    ("DCGAN block 128x256x8x8->128", 128, 256, 8, 128, 0, torch.nn.ReLU),
    ("pix2pix up 16x512x32x32->256 + skip 256", 16, 512, 32, 256, 256, torch.nn.ReLU),
    ("VAE up 16x256x32x32->128", 16, 256, 32, 128, 0, torch.nn.SiLU),
]
QUICK_DECODER_CELLS = [("quick 1x16x4x4->16 + skip 4", 1, 16, 4, 16, 4, torch.nn.ReLU)]


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


class DecoderBlock(torch.nn.Module):
    """A decoder block as models write it: ``act(bn(up(x)))``, concatenated with the skip
    tensor when there is one (pix2pix, U-Net)."""

    def __init__(self, c_in: int, c_out: int, activation: type):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
        self.bn = torch.nn.BatchNorm2d(c_out)
        self.act = activation()

    def forward(self, x, skip=None):
        y = self.act(self.bn(self.up(x)))
        return y if skip is None else torch.cat([y, skip], 1)


def traffic(cell, element_bytes: int = 2) -> dict[str, tuple[int, float]]:
    """Passes over memory and MB moved by one forward of a decoder block, from its shapes:
    eager PyTorch runs the convolution, the batch norm and the activation one after
    another, then copies both parts into the concatenation; ``torch.compile`` fuses the
    elementwise work and the concatenation into one pass after the convolution; fused,
    our kernel writes the block's output once (into the concatenation) and the skip is
    copied beside it.  The weight's bytes are left out (the same for all)."""
    _, n, c_in, size, c_out, skip, _ = cell
    x = n * c_in * size * size * element_bytes
    out = n * c_out * (2 * size) ** 2 * element_bytes
    s = n * skip * (2 * size) ** 2 * element_bytes
    concatenation = [(1, 2 * (out + s))] if skip else []  # read both parts, write both
    eager = [(1, x + out), (1, 2 * out), (1, 2 * out), *concatenation]
    compiled = [(1, x + out), (1, 2 * out + 2 * s)]
    fused = [(1, x + out), *([(1, 2 * s)] if skip else [])]
    return {name: (sum(p for p, _ in passes), sum(b for _, b in passes) / 2**20)
            for name, passes in (("fused", fused), ("eager", eager), ("compiled", compiled))}


def decoder_rows(cell, dtype_name: str, layout: str, device: str) -> list[dict]:
    name, n, c_in, size, c_out, skip_channels, activation = cell
    dtype = DTYPES[dtype_name]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    block = DecoderBlock(c_in, c_out, activation).to(device).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(n, c_in, size, size, device=device).contiguous(memory_format=memory_format)
    skip = torch.randn(n, skip_channels, 2 * size, 2 * size, device=device).contiguous(memory_format=memory_format) \
        if skip_channels else None
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double(), None if skip is None else skip.double())
    eager = block.to(dtype)
    x = x.to(dtype)
    skip = None if skip is None else skip.to(dtype)
    methods = {"fused": tritondeconv.convert(copy.deepcopy(eager), fuse=True), "eager": eager}
    if device == "cuda":
        methods["compiled"] = torch.compile(eager)
    rows = []
    with torch.no_grad():
        for method, model in methods.items():
            fn = (lambda model=model: model(x)) if skip is None else (lambda model=model: model(x, skip))
            err = relative_error(fn(), ref)
            if not err <= CHECK[dtype_name]:
                raise RuntimeError(f"{method} on {name} {dtype_name} {layout}: relative error {err:.2e}")
            rows.append(dict(block="decoder", shape=name, dtype=dtype_name, layout=layout, method=method,
                             median_ms=timer(fn), peak_mb=peak_bytes(fn, device) / 2**20, rel_error=err))
    return rows


def write_markdown(path: Path, rows: list[dict], header: str) -> None:
    lines = [header, ""]
    for block, ours, theirs in (("fold", "tritondeconv_fold", "interpolate_conv2d"), ("epilogue", "fused", "unfused"),
                                ("decoder", "fused", "eager"), ("decoder", "fused", "compiled")):
        keyed: dict[tuple, dict] = {}
        for r in rows:
            if r["block"].startswith(block):
                keyed.setdefault((r["block"], r["shape"], r["dtype"], r["layout"]), {})[r["method"]] = r
        keyed = {k: m for k, m in keyed.items() if ours in m and theirs in m}
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
    ap.add_argument("--traffic", action="store_true",
                    help="print the decoder blocks' passes over memory and MB moved (bf16), from shapes, and stop")
    a = ap.parse_args(argv)
    if a.traffic:
        print("| decoder block (bf16) | fused: passes, MB | eager: passes, MB | torch.compile: passes, MB |")
        print("| --- | --- | --- | --- |")
        for cell in DECODER_CELLS:
            t = traffic(cell)
            print(f"| {cell[0]} | " + " | ".join(f"{t[m][0]}, {t[m][1]:.0f}" for m in ("fused", "eager", "compiled"))
                  + " |")
        return 0
    device, name, out_dir = setup(a.out, quick=a.quick)
    dtypes = ["fp32"] if a.quick else ["bf16", "fp16"]
    layouts = ["nchw", "channels_last"]
    fold_cells = QUICK_FOLD_CELLS if a.quick else FOLD_CELLS
    epilogue_cells = [(QUICK_SUITES["2d"][0], "silu")] if a.quick else EPILOGUE_CELLS
    decoder_cells = QUICK_DECODER_CELLS if a.quick else DECODER_CELLS

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    columns = ["gpu", "versions", "block", "shape", "dtype", "layout", "method", "median_ms", "peak_mb", "rel_error"]
    sink = CsvSink(out_dir / "blocks.csv", [], columns)
    budget = Budget(a.budget, a.fake_clock)
    jobs = [("fold", c, d, lay) for c in fold_cells for d in dtypes for lay in layouts] + \
           [("epilogue", c, d, lay) for c in epilogue_cells for d in dtypes for lay in layouts] + \
           [("decoder", c, d, lay) for c in decoder_cells for d in dtypes for lay in layouts]
    for i, (kind, cell, dtype_name, layout) in enumerate(jobs, 1):
        if budget.spent():
            print(f"budget of {a.budget:g} s spent: stopped after {i - 1} of {len(jobs)} blocks", flush=True)
            break
        new = fold_rows(cell, dtype_name, layout, device) if kind == "fold" else \
            epilogue_rows(*cell, dtype_name, layout, device) if kind == "epilogue" else \
            decoder_rows(cell, dtype_name, layout, device)
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
