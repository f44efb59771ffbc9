"""Compile for Hopper, without a GPU, every kernel configuration the tuner can offer on
the benchmark suites' layers, and report what each one costs the chip.

    python perf/hopper_compile.py                # every suite cell, forward and backward
    python perf/hopper_compile.py --quick        # one small layer per path (a test runs this)

Nothing runs on a device.  The ops are called on CPU tensors with the Triton launches
intercepted, so every launch's arguments are exactly those of a GPU run of the same
layer (dtypes, layouts, and the integer values Triton specialises on: 1, and multiples
of 16); the shared memory used for pruning is the H100's.  Each distinct launch is then
compiled by Triton for an sm_90 target, and read:

* ``regs``, ``local_bytes``: registers per thread and local memory per thread (spills;
  anything above 0 is slow), from ``cuobjdump --dump-resource-usage`` of the cubin;
* ``shared_bytes``: the launch's shared memory (must fit the 227 KiB of an H100 block);
* ``wgmma``: Hopper warpgroup MMA instructions in the PTX (a tensor-core configuration
  without them runs on the older, slower ``mma.sync`` path);
* ``async_copies``: ``cp.async`` instructions (global loads software-pipelined through
  shared memory over ``num_stages``).

Writes ``hopper_compile.csv`` and ``hopper_compile.md`` to ``--out`` (default
``perf/results/static-sm90/triton-<version>``) and exits non-zero if any configuration
fails to compile or does not fit an H100 block.  Spills are reported, not failed: they
depend on the Triton version (``perf/NOTES.md``) and cost time, not correctness.  A
static report: it predicts no time.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, not the interpreter (read at import)

import argparse  # noqa: E402
import csv  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import tritondeconv.ops  # noqa: E402
from tritondeconv.kernels import phase_gemm, weight_grad  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import DTYPES, FUNCTIONS, LAYOUTS, SUITES, Cell  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100 = ("NVIDIA H100 80GB HBM3", 232448)  # name, shared memory per block (bytes)
REGISTERS_PER_SM = 65536
KERNELS = {"_phase_gemm_kernel": phase_gemm, "_weight_grad_kernel": weight_grad}  # kernel -> its module
OPTIONS = ("num_warps", "num_stages")
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# The quick run: small layers that between them reach both paths (tensor cores, FMA for
# few channels) in both directions and the weight gradient, with rows enough for a
# warpgroup-sized (64-row) tensor-core tile.
QUICK = [Cell("quick-wide", 1, 64, (8, 8), 64, 4, 2, 1), Cell("quick-rgb", 2, 32, (6, 6), 3, 4, 2, 1)]


@dataclass(frozen=True)
class Launch:
    """One launch to compile: the kernel, its signature and constants as Triton would
    specialise them, the launch options, and a readable description of the tile."""

    kernel: str
    signature: tuple
    constants: tuple
    divisible: tuple
    options: tuple

    @property
    def tile(self) -> str:
        c, o = dict(self.constants), dict(self.options)
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{o['num_warps']} s{o['num_stages']}"


def _specialise(kernel, args: tuple, kwargs: dict) -> Launch:
    """What Triton's JIT makes of one call: pointers typed by dtype, integers equal to 1
    turned into constants, and the pointers and integers divisible by 16 marked so."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    signature, constants, divisible = {}, {}, []
    for i, name in enumerate(names):
        v = values[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + TYPES[v.dtype]
            divisible.append(i)  # the caching allocator's blocks are 256-byte aligned
        elif name in constexprs:
            signature[name], constants[name] = "constexpr", v
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(i)
    options = tuple((k, kwargs[k]) for k in OPTIONS)
    return Launch(kernel.__name__, tuple(signature.items()), tuple(constants.items()), tuple(divisible), options)


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records
    the call instead of launching it."""

    def __init__(self, kernel, launches: set):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.add(_specialise(self.kernel, args, kwargs))


def _offer_every_candidate(device_name, key, candidates, launch, tune=None):
    """A ``Tuner.pick`` that launches every candidate once (so each is recorded)."""
    offered = candidates()
    for config in offered:
        launch(config)
    return offered[0]


@contextmanager
def recording(launches: set):
    """While inside: the ops run their Triton path on CPU tensors, as on an H100, and
    every kernel launch of every candidate configuration lands in ``launches``."""
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    patch(tritondeconv.ops, "runs_triton", lambda device: True)
    for name, module in KERNELS.items():
        patch(module, name, _Recorder(getattr(module, name), launches))
        patch(module, "device_limits", lambda device: H100)
        patch(module._TUNER, "pick", _offer_every_candidate)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def record(cell: Cell, dtype: torch.dtype, layout: str, launches: set) -> None:
    """The launches of one cell's forward and backward (outputs are never written:
    the values computed on the CPU are meaningless, only the calls matter)."""
    ours, _ = FUNCTIONS[cell.rank]
    x = torch.empty(cell.n, cell.c_in, *cell.spatial, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[cell.rank])
    w = torch.empty(cell.c_in, cell.c_out, *(cell.k,) * cell.rank, dtype=dtype, requires_grad=True)
    b = torch.empty(cell.c_out, dtype=dtype, requires_grad=True)
    x.requires_grad_()
    with recording(launches):
        y = ours(x, w, b, cell.s, cell.p, cell.op)
        torch.autograd.grad(y, (x, w), torch.empty_like(y))


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _mode(constants: dict) -> str:
    """The launch's variant in a few words: direction, dot precision, index width."""
    words = [] if "TRANSPOSED" not in constants else ["transposed" if constants["TRANSPOSED"] else "direct"]
    words += ["tf32"] * (constants["INPUT_PRECISION"] == "tf32") + ["int64"] * constants["INT64_INDEX"]
    return " ".join(words)


def compile_launch(launch: Launch) -> dict:
    """Compile one launch for sm_90 and read its resources."""
    kernel = vars(KERNELS[launch.kernel])[launch.kernel]
    source = ASTSource(kernel, dict(launch.signature), dict(launch.constants),
                       {(i,): [["tt.divisibility", 16]] for i in launch.divisible})
    constants = dict(launch.constants)
    row = dict(kernel=launch.kernel.strip("_").removesuffix("_kernel"), tile=launch.tile,
               dtype=dict(launch.signature)["x_ptr"][1:], mode=_mode(constants),
               constants=" ".join(f"{k}={v}" for k, v in launch.constants))
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=TARGET, options=dict(launch.options))
    except Exception as error:  # noqa: BLE001  (every failure is a row of the report)
        return row | dict(error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    row["compile_s"] = round(time.perf_counter() - start, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                               check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    threads = dict(launch.options)["num_warps"] * 32
    row.update(regs=int(fields["REG"]), local_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
               shared_bytes=compiled.metadata.shared + int(fields["SHARED"]),
               wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
               async_copies=len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)), error="")
    row["fits"] = row["shared_bytes"] <= H100[1] and row["regs"] * threads <= REGISTERS_PER_SM
    return row


def report(rows: list[dict], cells: dict, out: Path) -> list[dict]:
    """Write the CSV and the markdown summary; return the rows that fail (do not compile,
    or do not fit)."""
    columns = ["kernel", "dtype", "mode", "tile", "regs", "local_bytes", "shared_bytes", "fits", "wgmma",
               "mma_sync", "async_copies", "compile_s", "error", "cells", "constants"]
    for r in rows:
        r["cells"] = "; ".join(sorted(cells[r["key"]]))
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["mode"], r["tile"], r["constants"]))
    with open(out / "hopper_compile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    bad = [r for r in rows if r["error"] or not r["fits"]]
    ok = [r for r in rows if not r["error"]]
    dot = [r for r in ok if r["wgmma"] + r["mma_sync"] > 0]
    contiguous = [r for r in ok if "sxc=1" in r["constants"].split()]
    strided = [r for r in ok if "sxc=1" not in r["constants"].split()]
    lines = [
        f"# Hopper (sm_90) compile report: triton {triton.__version__}, torch {torch.__version__}", "",
        f"{len(rows)} distinct launches (kernel, dtype, tile, specialisation) from "
        f"{len({c for v in cells.values() for c in v})} (cell, dtype, layout) combinations, forward and backward; "
        "compiled, not run.", "",
        f"- failed to compile: {len(rows) - len(ok)}",
        f"- do not fit an H100 block (shared memory or registers): {sum(not r['fits'] for r in ok)}",
        f"- spill to local memory: {sum(r['local_bytes'] > 0 for r in ok)} "
        f"(input channels contiguous: {sum(r['local_bytes'] > 0 for r in contiguous)} of {len(contiguous)}; "
        f"strided, as NCHW and 1-D inputs: {sum(r['local_bytes'] > 0 for r in strided)} of {len(strided)})",
        f"- tensor-core launches on wgmma: {sum(r['wgmma'] > 0 for r in dot)} of {len(dot)}",
        f"- launches with software-pipelined (cp.async) loads: {sum(r['async_copies'] > 0 for r in ok)} of {len(ok)}",
        "", "Per tile, its launches (one per direction, layout and set of specialised integer arguments) in one "
        "row; `hopper_compile.csv` has every launch, its constants and the cells that make it:", "",
        "| kernel | dtype | tile | launches | spilling | max local B | max regs | max shared KiB | on wgmma "
        "| with cp.async | errors |",
        "|" + " --- |" * 11,
    ]
    tiles: dict[tuple, list[dict]] = {}
    for r in rows:
        tiles.setdefault((r["kernel"], r["dtype"], r["tile"]), []).append(r)
    for (kernel, dtype, tile), group in tiles.items():
        built = [r for r in group if not r["error"]]
        most = {k: max((r[k] for r in built), default=0) for k in ("local_bytes", "regs", "shared_bytes")}
        lines.append(f"| {kernel} | {dtype} | {tile} | {len(group)} | {sum(r['local_bytes'] > 0 for r in built)} "
                     f"| {most['local_bytes']} | {most['regs']} | {most['shared_bytes'] / 1024:.0f} "
                     f"| {sum(r['wgmma'] > 0 for r in built)} | {sum(r['async_copies'] > 0 for r in built)} "
                     f"| {len(group) - len(built)} |")
    (out / "hopper_compile.md").write_text("\n".join(lines) + "\n")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small layers, bf16 and fp32")
    ap.add_argument("--suites", default="2d,1d,3d")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "static-sm90" / f"triton-{triton.__version__}")
    a = ap.parse_args(argv)
    suite = QUICK if a.quick else [c for s in a.suites.split(",") for c in SUITES[s]]
    dtypes = ["bf16", "fp32"] if a.quick else a.dtypes.split(",")

    cells: dict[Launch, set[str]] = {}
    for cell in suite:
        for dtype in dtypes:
            for layout in LAYOUTS[cell.rank]:
                launches: set[Launch] = set()
                record(cell, DTYPES[dtype], layout, launches)
                for launch in launches:
                    cells.setdefault(launch, set()).add(f"{cell.label} {dtype} {layout}")
    print(f"{len(cells)} distinct launches from {len(suite)} cells; compiling for sm_90 with {a.jobs} processes",
          flush=True)
    rows = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for i, (launch, row) in enumerate(zip(cells, pool.map(compile_launch, cells)), 1):
            rows.append(row | dict(key=launch))
            status = row["error"] or f"regs {row['regs']}, local {row['local_bytes']} B, shared {row['shared_bytes']} B"
            print(f"[{i}/{len(cells)}] {row['kernel']} {row['dtype']} {row['tile']}: {status}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    bad = report(rows, {r["key"]: cells[r["key"]] for r in rows}, a.out)
    print(f"wrote {a.out / 'hopper_compile.csv'} and {a.out / 'hopper_compile.md'}; {len(bad)} failing launches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
