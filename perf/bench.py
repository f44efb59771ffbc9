"""Benchmark tritondeconv against the naive zero-insertion op, cuDNN and a torch-level
sub-pixel rewrite, over suites of real layers: 2-D, and 1-D (a HiFi-GAN vocoder's
upsamplers) and 3-D (a 3-D U-Net decoder) against cuDNN.

    python perf/bench.py                      # on a GPU: every suite
    python perf/bench.py --suites 2d          # one suite
    python perf/bench.py --cells U-Net --methods tritondeconv,cudnn --budget 480
    python perf/bench.py --cells U-Net --methods tritondeconv,phases,one_gemm   # each variant forced
    python perf/bench.py --quick              # a smoke run of the harness (tiny shapes; CPU ok)

Each row of ``bench.csv`` is written and flushed as soon as its (cell, method) is
measured, so the file is valid whenever the run stops; ``--budget SECONDS`` stops after
the cell in progress once that much time has passed.  Without a GPU only ``--quick``
runs (the interpreter is no place to time the suites).

Every method's result is checked against float64 before it is timed, and each of
tritondeconv's methods must have launched a Triton kernel (an aten fallback is never
timed under its name); times are the median of ``triton.testing.do_bench`` (on CPU, in
``--quick``, a wall-clock median).  Without a GPU the kernels run in the Triton
interpreter (``TRITON_INTERPRET=1``, set here unless the environment sets it), and the
``cudnn`` method is PyTorch's own CPU convolution; with ``TRITON_INTERPRET=1`` on a GPU
machine the run is the same CPU one.
The same run measures the matmul peak per dtype and the copy bandwidth, which give each
cell its roofline.  Tuning starts from an empty cache (a temporary
``TRITONDECONV_CACHE_DIR``, removed at the end, and no shipped tunings, unless a cache
folder is set), so the ``tuning_s`` column is the first-call tuning time of each cell's
new shape keys; the tuned cache is copied beside the results.  Writes ``bench.csv`` and
``bench.md`` to ``perf/results/<gpu-name>/`` (or ``--out``); ``perf/plot.py`` draws them.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Only the interpreter can run the kernels without a GPU; it must be chosen before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import tritondeconv  # noqa: E402
from tritondeconv.kernels import launcher, tuning  # noqa: E402
from tritondeconv.kernels.common import INTERPRETING, observe_launches  # noqa: E402

# Where the kernels run: compiled, on the GPU; or in the interpreter, on CPU tensors (also
# on a GPU machine with TRITON_INTERPRET=1, where CUDA tensors would be copied to the host).
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error against float64 a result must meet before it is timed (TF32 for fp32).
CHECK_TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-3}


@dataclass(frozen=True)
class Cell:
    """One suite layer: (N, C_in, *spatial) -> C_out, kernel k, stride s, padding p,
    output_padding op (the same along every spatial axis), in ``groups`` groups."""

    name: str
    n: int
    c_in: int
    spatial: tuple[int, ...]
    c_out: int
    k: int
    s: int
    p: int = 0
    op: int = 0
    groups: int = 1

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def label(self) -> str:
        tail = (f" op{self.op}" if self.op else "") + (f" g{self.groups}" if self.groups > 1 else "")
        size = "x".join(map(str, (self.n, self.c_in, *self.spatial)))
        return f"{self.name} {size}->{self.c_out} k{self.k} s{self.s} p{self.p}{tail}"


SUITES = {
    "2d": [
        Cell("DCGAN", 128, 512, (4, 4), 256, 4, 2, 1),
        Cell("DCGAN", 128, 256, (8, 8), 128, 4, 2, 1),
        Cell("DCGAN", 128, 128, (16, 16), 64, 4, 2, 1),
        Cell("DCGAN-RGB", 128, 64, (32, 32), 3, 4, 2, 1),
        Cell("U-Net", 16, 1024, (32, 32), 512, 2, 2),
        Cell("U-Net", 16, 256, (128, 128), 128, 2, 2),
        Cell("U-Net", 16, 128, (256, 256), 64, 2, 2),
        Cell("generic", 32, 256, (64, 64), 128, 3, 2, 1, 1),
        Cell("large", 8, 512, (128, 128), 256, 4, 2, 1),
        Cell("FCN", 1, 21, (64, 64), 21, 16, 8, 4),
        Cell("segmentation", 8, 64, (128, 128), 32, 4, 2, 1),
    ],
    "1d": [  # HiFi-GAN's upsampling stack, batch 16
        Cell("HiFi-GAN", 16, 512, (32,), 256, 16, 8, 4),
        Cell("HiFi-GAN", 16, 256, (256,), 128, 16, 8, 4),
        Cell("HiFi-GAN", 16, 128, (2048,), 64, 4, 2, 1),
        Cell("HiFi-GAN", 16, 64, (4096,), 32, 4, 2, 1),
    ],
    "small": [  # decoder layers whose calls are short enough for the host to decide (bf16 channels-last on an H200)
        Cell("decoder", 64, 128, (16, 16), 64, 4, 2, 1),
        Cell("decoder", 4, 512, (32, 32), 128, 4, 2, 1),
        Cell("decoder", 32, 512, (16, 16), 512, 3, 2),
    ],
    # The layer classes that lose most to cuDNN by layout or width, not host: depthwise and
    # few channels per group (channels-last: the grouped kernel), few output channels
    # (an RGB output layer; FSRCNN's 56 -> 1 k9 s3 output layer).
    "classes": [
        Cell("depthwise", 8, 256, (64, 64), 256, 4, 2, 1, groups=256),
        Cell("depthwise", 16, 128, (64, 64), 128, 3, 2, 1, 1, groups=128),
        Cell("grouped", 8, 256, (64, 64), 256, 4, 2, 1, groups=64),
        Cell("RGB-output", 16, 64, (128, 128), 3, 4, 2, 1),
        Cell("SR-output", 16, 56, (64, 64), 1, 9, 3, 4, 2),
    ],
    "3d": [  # a 3-D U-Net decoder, batch 2
        Cell("3D-U-Net", 2, 256, (16, 32, 32), 128, 2, 2),
        Cell("3D-U-Net", 2, 64, (32, 64, 64), 32, 2, 2),
        Cell("3D-U-Net", 2, 128, (16, 32, 32), 64, 3, 2, 1, 1),
    ],
}
QUICK_SUITES = {
    "2d": [Cell("quick-U-Net", 2, 8, (5, 5), 4, 2, 2), Cell("quick-op", 1, 4, (4, 3), 3, 3, 2, 1, 1)],
    "1d": [Cell("quick-1d", 2, 8, (7,), 4, 4, 2, 1)],
    "small": [Cell("quick-small", 1, 8, (4, 4), 8, 4, 2, 1)],
    "3d": [Cell("quick-3d", 1, 4, (3, 3, 2), 3, 3, 2, 1, 1)],
    "classes": [Cell("quick-depthwise", 1, 8, (4, 5), 8, 4, 2, 1, groups=8)],
}
FUNCTIONS = {  # rank -> (ours, PyTorch's)
    1: (tritondeconv.conv_transpose1d, F.conv_transpose1d),
    2: (tritondeconv.conv_transpose2d, F.conv_transpose2d),
    3: (tritondeconv.conv_transpose3d, F.conv_transpose3d),
}
# Every method a cell can be timed with (naive and subpixel_torch: 2-D forward only).
METHODS = ("tritondeconv", "cudnn", "naive", "subpixel_torch")
# tritondeconv with the forward forced onto one kernel variant, each tuned among its own
# candidates, where the layer offers it (kernel size = stride: the phase GEMMs or the
# one GEMM; fewer than 16 output channels per group: the phases side by side as
# columns; the experimental TMA phase GEMM where TRITONDECONV_EXPERIMENTAL=tma and the
# layout allows it); timed only when asked for (--methods).
VARIANTS = {"phases": (("ONE_GEMM", False), ("TMA_W", False), ("PHASE_COLUMNS", False)),
            "one_gemm": (("ONE_GEMM", True),), "tma": (("TMA_W", True),), "phase_columns": (("PHASE_COLUMNS", True),),
            # The races on NCHW operands (forward, input gradient, weight gradient): the
            # GEMM on channels-last copies of its strided operands, or on them as given.
            "staged": (("staged", True),), "gathered": (("staged", False),),
            # The race on channels-last layers of few channels per group: the grouped
            # kernel (the groups side by side), or the phase GEMM (one group per program).
            "grouped": (("grouped", True),), "per_group": (("grouped", False),)}
# The methods that are tritondeconv's own: each must launch a Triton kernel.
OURS = ("tritondeconv", "naive", *VARIANTS)
# The layouts a rank's input can come in ("channels_last" is channels_last_3d in 3-D).
LAYOUTS = {1: ["nchw"], 2: ["nchw", "channels_last"], 3: ["nchw", "channels_last"]}


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
    y = F.pixel_shuffle(F.conv2d(x, v, None, padding=m - 1), cell.s)
    y = y[..., cell.p: cell.p + h_out, cell.p: cell.p + w_out]
    return y if b is None else y + b[:, None, None]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def timer(fn) -> float:
    """Median milliseconds of ``fn``: do_bench on a GPU, a wall clock on the CPU."""
    if DEVICE == "cuda":
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
        peaks[name] = 2 * n**3 / (timer(lambda a=a, b=b: a @ b) * 1e-3) / 1e12
    src = torch.empty((2**18 if quick else 2**30) // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9
    return peaks, bandwidth


def kernel_us(run: Callable[[], object], calls: int = 10) -> float:
    """GPU kernel time per call of ``run``, in µs: the durations of the device's kernels
    (and copies) ``calls`` calls launch, as ``torch.profiler`` records them, summed (no
    host time, no gaps between kernels); NaN where nothing can be recorded."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    device_events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if device_events:
        return sum(e.time_range.elapsed_us() for e in device_events) / calls
    total = sum(e.self_device_time_total for e in profiler.key_averages())  # (where the events hide the kernels)
    return total / calls if total else math.nan


def back_to_back_us(runs: dict[str, Callable[[], object]], calls: int, rounds: int = 5) -> dict[str, float]:
    """Wall time per call of each of ``runs``, in µs, host included: ``calls`` calls one
    after another and one synchronisation, in ``rounds`` rounds that alternate the runs
    (so that a drift of the machine's speed hits all alike); the median round.
    ``do_bench`` clears a 256 MB buffer before each timed call, which hides up to tens of
    µs of host time per call: this does not."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                run()
            sync()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def graphed_us(run: Callable[[], object], calls: int) -> float:
    """Time per replay of ``run`` captured in a CUDA graph, in µs: ``calls`` replays and
    one synchronisation (warmed up first on a side stream, as capture requires); NaN,
    with the reason printed, where ``run`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6
    except Exception as error:  # noqa: BLE001  (a method that cannot be captured is reported, not fatal)
        print(f"  (not captured in a CUDA graph: {type(error).__name__}: {str(error).splitlines()[0][:200]})",
              flush=True)
        return math.nan


def run_cell(cell: Cell, dtype_name: str, layout: str, pass_: str, device: str, selected=METHODS,
             back_to_back: int = 0):
    """Check every applicable method of ``selected`` on one cell, then time each: the
    median of ``timer`` (``median_ms``), and with ``back_to_back`` calls (0: not) the
    wall time per call of that many calls in a row, the methods alternating (``wall_us``),
    and on a GPU the kernels' own time (``gpu_us``) and the time per replay of a CUDA
    graph (``graphed_us``).  Yields one row per method once the cell is measured (ours
    with ``tuning_s``: the tuning its first call did)."""
    dtype = DTYPES[dtype_name]
    ours, torch_fn = FUNCTIONS[cell.rank]
    x = torch.randn(cell.n, cell.c_in, *cell.spatial, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[cell.rank])
    fan_in = cell.c_in // cell.groups * cell.k
    w = (torch.randn(cell.c_in, cell.c_out // cell.groups, *(cell.k,) * cell.rank, device=device, dtype=dtype)
         / math.sqrt(fan_in)).to(dtype)
    b = torch.randn(cell.c_out, device=device, dtype=dtype)
    args = (cell.s, cell.p, cell.op, cell.groups)
    ref = torch_fn(x.double(), w.double(), b.double(), *args)
    # The output's gradient in the layer's output layout (channels-last for channels-last
    # input), as a loss computed from the output gives it; not the float64 reference's,
    # whose layout is its slow path's (NCHW on a GPU).
    grad_y = torch.randn_like(torch_fn(x, w, b, *args)).to(dtype)

    methods = {
        "tritondeconv": lambda x, w: ours(x, w, b, *args),
        "cudnn": lambda x, w: torch_fn(x, w, b, *args),
    }
    if pass_ in GRADIENTS:  # one gradient alone: our op against aten's convolution_backward
        methods, ref = _gradient_methods(cell, pass_, x, w, grad_y)
    if pass_ == "fwd" and cell.rank == 2 and cell.groups == 1:
        h_out, w_out = ref.shape[-2:]
        methods["naive"] = lambda x, w: tritondeconv.naive_conv_transpose2d(x, w, b, *args)
        if cell.k % cell.s == 0 and cell.op == 0:
            v = subpixel_weight(w, cell.s)  # rearranged once, as a layer would keep it
            methods["subpixel_torch"] = lambda x, w: subpixel_conv_transpose2d(x, v, b, cell, h_out, w_out)

    for method, only in VARIANTS.items():
        methods[method] = _forced(only, methods["tritondeconv"])

    checked = {}
    for method, fn in methods.items():
        if method not in selected:
            continue
        if pass_ not in TRAINING:
            def run(fn=fn):
                return fn(x, w)
        else:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

            def run(fn=fn, xg=xg, wg=wg):
                with torch.autograd.set_multithreading_enabled(TRAINING[pass_]):
                    return torch.autograd.grad(fn(xg, wg), (xg, wg), grad_y)
        tuned_before = len(tuning.TUNING_LOG)
        with observe_launches() as launches:
            result = run()  # the first call: tunes every new shape key
        tuning_s = sum(t.seconds for t in tuning.TUNING_LOG[tuned_before:])
        if method in OURS and not launches:
            raise RuntimeError(f"{method} on {cell.label} {dtype_name} {layout} {pass_} launched no Triton kernel "
                               "(it fell back to aten), so its time would not be tritondeconv's")
        if method in VARIANTS and not _offered(
                method, launches, lambda only, kernel: _takes(methods["tritondeconv"], x, w, only, kernel)):
            print(f"{method}: not offered for {cell.label} {dtype_name} {layout} {pass_}", flush=True)
            continue
        out = result if pass_ not in TRAINING else fn(x, w)
        err = relative_error(out, ref)
        if not err <= CHECK_TOLERANCE[dtype_name]:
            raise RuntimeError(f"{method} on {cell.label} {dtype_name} {layout}: relative error {err:.2e}")
        checked[method] = (run, err, tuning_s if method == "tritondeconv" else "")
    wall = (back_to_back_us({method: run for method, (run, _, _) in checked.items()}, back_to_back)
            if back_to_back else {})
    for method, (run, err, tuning_s) in checked.items():
        compiled = DEVICE == "cuda" and back_to_back
        yield dict(method=method, median_ms=timer(run), rel_error=err, tuning_s=tuning_s,
                   wall_us=wall.get(method, ""), gpu_us=kernel_us(run) if compiled else "",
                   graphed_us=graphed_us(run, back_to_back) if compiled else "")


# The passes that run a training step, forward and backward: each with whether the
# backward runs on the autograd engine's device thread (PyTorch's default) or inline on
# the calling thread (``torch.autograd.set_multithreading_enabled(False)``).
TRAINING = {"fwd+bwd": True, "fwd+bwd-inline": False}
# The backward's two parts, each timed alone: the input gradient and the weight gradient.
GRADIENTS = {"dgrad": 0, "wgrad": 1}


def _gradient_methods(cell: Cell, pass_: str, x, w, grad_y) -> tuple[dict, torch.Tensor]:
    """The methods of a gradient pass (ours: the gradient op; cuDNN: aten's
    ``convolution_backward`` asked for that gradient alone) and its float64 reference."""
    r = cell.rank
    stride, padding, dilation, output_padding = [cell.s] * r, [cell.p] * r, [1] * r, [cell.op] * r
    which = GRADIENTS[pass_]
    mask = [which == 0, which == 1, False]

    def aten(x, w, grad_y):
        return torch.ops.aten.convolution_backward(grad_y, x, w, None, stride, padding, dilation, True, output_padding,
                                                   cell.groups, mask)[which]

    ours = {"dgrad": lambda x, w: torch.ops.tritondeconv.conv_transpose_input_grad(
                grad_y, w, list(x.shape[2:]), stride, padding, dilation, cell.groups),
            "wgrad": lambda x, w: torch.ops.tritondeconv.conv_transpose_weight_grad(
                x, grad_y, list(w.shape[2:]), stride, padding, dilation, cell.groups)}[pass_]
    return ({"tritondeconv": ours, "cudnn": lambda x, w: aten(x, w, grad_y)},
            aten(x.double(), w.double(), grad_y.double()))


def _offered(method: str, launches: list, takes: Callable[[tuple, str], bool]) -> bool:
    """Whether a run forced onto the variant ``method`` (``launches``: what it launched)
    took it: a staging copy (``staged``) or the grouped kernel (``grouped``); the input
    as given, or the phase GEMM per group, where the race offered the other
    (``gathered``, ``per_group``: ``takes(only, kernel)``, whether the run forced onto
    the other launches that kernel); a forward phase GEMM with the variant's constants
    (the others)."""
    if method in ("staged", "grouped"):
        return _launched(launches, {"staged": "staging", "grouped": "grouped"}[method])
    if method == "gathered":
        return takes(VARIANTS["staged"], "staging")
    if method == "per_group":
        return takes(VARIANTS["grouped"], "grouped")
    return any(launch.constants.get("TRANSPOSED")
               and all(bool(launch.constants.get(constant)) == on for constant, on in VARIANTS[method])
               for launch in launches)


def _takes(fn, x, w, only: tuple, kernel: str) -> bool:
    """Whether ``fn(x, w)`` forced onto ``only`` launches ``kernel``, its launches replaced
    (nothing compiled, tuned or computed)."""
    with launcher.intercept(launch=lambda request, config: None, choose=lambda request, candidates: candidates[0],
                            only=only), observe_launches() as launches:
        fn(x, w)
    return _launched(launches, kernel)


def _launched(launches: list, kernel: str) -> bool:
    """Whether ``launches`` include one of ``kernel`` (``"staging"``: a channels-last copy
    of a GEMM's input)."""
    return any(launch.kernel == kernel for launch in launches)


def _forced(only: tuple, fn):
    """``fn`` with every launch that offers the variant ``only`` taking it (tuned among
    that variant's candidates alone)."""
    def run(x, w):
        with launcher.intercept(only=only):
            return fn(x, w)
    return run


def roofline(cell: Cell, dtype_name: str, pass_: str) -> tuple[float, float]:
    """Useful FLOPs and minimum bytes of one cell (backward: grad_input and grad_weight
    each redo the forward's multiply-adds and read/write the same tensors once more)."""
    r = cell.rank
    plan = tritondeconv.plan(cell.spatial, (cell.k,) * r, (cell.s,) * r, (cell.p,) * r, (1,) * r, (cell.op,) * r)
    macs = plan.macs(cell.n, cell.c_in, cell.c_out, cell.groups)["useful"]
    elements = (cell.n * cell.c_in * math.prod(cell.spatial) + cell.c_in * cell.c_out // cell.groups * cell.k**r
                + cell.n * cell.c_out * math.prod(plan.output_shape))
    factor = 3 if pass_ in TRAINING else 1
    return 2.0 * macs * factor, elements * DTYPES[dtype_name].itemsize * factor


def gpu_name(device: str) -> str:
    """The GPU's name, or ``cpu-interpreter-<machine>`` for the interpreter on CPU."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu-interpreter-{platform.machine()}"


def where_kernels_run(device: str, name: str) -> str:
    """Where this run's Triton kernels run, as the progress output says it."""
    if device == "cuda":
        return f"tritondeconv's kernels compiled for {name}; cudnn is cuDNN"
    return "tritondeconv's kernels in the Triton interpreter on CPU tensors; cudnn is PyTorch's CPU convolution"


def setup(out: Path | None, measuring: bool = True, quick: bool = True) -> tuple[str, str, Path]:
    """The device, its name and the results folder (``out``, default
    ``perf/results/<gpu-name>``; created by whatever first writes into it); cuDNN set to
    pick its fastest algorithm.  When ``measuring``, exits with one line if there is
    nothing to time here: without a GPU, anything but a ``quick`` smoke run, or any run
    with ``TRITON_INTERPRET`` set to anything but 1 (CPU tensors would go to aten)."""
    device = DEVICE
    if measuring and device == "cpu" and not quick:
        sys.exit("no GPU here: the suites are timed on a GPU; for a smoke run of the harness on the CPU, "
                 "run python perf/bench.py --quick")
    if measuring and device == "cpu" and not INTERPRETING:
        sys.exit(f"no GPU, and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} defined the kernels for "
                 "the compiler: CPU tensors would fall back to aten and nothing of tritondeconv's would be timed; "
                 "unset it or set it to 1")
    torch.backends.cudnn.benchmark = True
    name = gpu_name(device)
    out_dir = out or Path(__file__).parent / "results" / name.replace(" ", "_")
    return device, name, out_dir


def write_markdown(path: Path, rows: list[dict], header: str) -> None:
    """One line per (cell, dtype, layout, pass): times, speedups, roofline; geometric means."""
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["rank"], r["shape"], r["dtype"], r["layout"], r["pass"]), {})[r["method"]] = r
    lines = [header, "", "| shape | dtype | layout | pass | tritondeconv ms | cuDNN ms | naive ms | subpixel ms "
             "| × cuDNN | × naive | × subpixel | % roofline | tuning s |", "|" + " --- |" * 13]
    speedups: dict[tuple[str, str, str], list[float]] = {}
    for (rank, shape, dtype, layout, pass_), m in keyed.items():
        if "tritondeconv" not in m:  # (a run with --methods that left ours out)
            continue
        ours = m["tritondeconv"]["median_ms"]

        def cell(method, m=m):
            return f"{m[method]['median_ms']:.3f}" if method in m else "–"

        def ratio(method, m=m, rank=rank, pass_=pass_, ours=ours):
            if method not in m:
                return "–"
            speedups.setdefault((rank, pass_, method), []).append(m[method]["median_ms"] / ours)
            return f"{m[method]['median_ms'] / ours:.2f}"

        lines.append(f"| {shape} | {dtype} | {layout} | {pass_} | {ours:.3f} | {cell('cudnn')} | {cell('naive')} "
                     f"| {cell('subpixel_torch')} | {ratio('cudnn')} | {ratio('naive')} | {ratio('subpixel_torch')} "
                     f"| {m['tritondeconv']['pct_roofline']:.0f} | {m['tritondeconv']['tuning_s']:.1f} |")
    timed = [(key, m) for key, m in keyed.items() if "tritondeconv" in m and m["tritondeconv"].get("wall_us") != ""]
    if timed:
        lines += ["", "Per call, µs: back-to-back wall time (host included), the kernels' own time (profiler), a CUDA "
                  "graph's replay; ours / cuDNN's:", "",
                  "| shape | dtype | layout | pass | wall | GPU kernels | graphed |", "|" + " --- |" * 7]
        for (_rank, shape, dtype, layout, pass_), m in timed:
            def pair(column, m=m):
                if "cudnn" not in m or m["cudnn"].get(column) in ("", None):
                    return f"{m['tritondeconv'][column]:.1f}" if m["tritondeconv"].get(column) != "" else "–"
                return f"{m['tritondeconv'][column]:.1f} / {m['cudnn'][column]:.1f}"
            lines.append(f"| {shape} | {dtype} | {layout} | {pass_} | {pair('wall_us')} | {pair('gpu_us')} "
                         f"| {pair('graphed_us')} |")
    lines += ["", "Geometric-mean speedup of tritondeconv (time of the other method / ours):", ""]
    for (rank, pass_, method), values in sorted(speedups.items()):
        geo = math.exp(sum(map(math.log, values)) / len(values))
        lines.append(f"- {rank}, {pass_}, over {method}: **{geo:.2f}×** "
                     f"({len(values)} cells, worst {min(values):.2f}×)")
    path.write_text("\n".join(lines) + "\n")


COLUMNS = ["gpu", "rank", "shape", "dtype", "layout", "pass", "method", "median_ms", "tflops", "gbps",
           "pct_roofline", "tuning_s", "rel_error", "peak_tflops", "copy_gbps", "versions", "date",
           "wall_us", "gpu_us", "graphed_us"]
# The columns of ``--back-to-back`` runs (empty otherwise; the GPU's two without a GPU).
TIMES_US = ("wall_us", "gpu_us", "graphed_us")


def read_csv(path: Path) -> list[dict]:
    """Rows of a bench.csv, numbers as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("median_ms", "tflops", "gbps", "pct_roofline", "rel_error", "peak_tflops", "copy_gbps"):
            r[key] = float(r[key])
        for key in ("tuning_s", *TIMES_US):
            r[key] = float(r[key]) if r.get(key) else ""
    return rows


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows whose (shape, dtype, layout, pass) ``new`` does not re-measure, then ``new``."""
    measured = {(r["shape"], r["dtype"], r["layout"], r["pass"]) for r in new}
    return [r for r in old if (r["shape"], r["dtype"], r["layout"], r["pass"]) not in measured] + new


class CsvSink:
    """``bench.csv``, written as the run goes: on the first row, the folder, the header and
    the earlier rows kept (``kept``); then every row, flushed as soon as it is measured,
    so the file is valid whatever moment the run stops.  Nothing is created if nothing
    is written.  ``rows``: every row in the file."""

    def __init__(self, path: Path, kept: list[dict], columns: list[str] = COLUMNS):
        self.path, self.rows, self._kept, self._file, self.columns = path, [], kept, None, columns

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()
        for row in self._kept:  # (rows of an older file may lack a newer column)
            self._writer.writerow({k: row.get(k, "") for k in self.columns})
        self.rows += self._kept
        self._file.flush()

    def write(self, row: dict) -> None:
        if self._file is None:
            self._open()
        self._writer.writerow({k: row[k] for k in self.columns})
        self._file.flush()
        self.rows.append(row)

    def close(self) -> None:
        if self._file is None and self._kept:
            self._open()
        if self._file is not None:
            self._file.close()


def write_results(out_dir: Path, rows: list[dict]) -> None:
    """bench.md (the header names each run's GPU, versions and measured roofs) beside the
    bench.csv the run wrote."""
    runs = dict.fromkeys((r["gpu"], r["versions"], r["copy_gbps"]) for r in rows)
    peaks = {(r["copy_gbps"], r["dtype"]): r["peak_tflops"] for r in rows}
    lines = [f"# tritondeconv benchmark on {rows[0]['gpu']}", ""]
    for gpu, versions, bandwidth in runs:
        roofs = ", ".join(f"{d} {p:.0f} TFLOP/s" for (b, d), p in peaks.items() if b == bandwidth)
        lines.append(f"- run on {gpu}, {versions}: matmul peak {roofs}; copy bandwidth {bandwidth:.0f} GB/s "
                     "(measured in the run, as was every baseline beside our time)")
        if gpu.startswith("cpu-interpreter"):
            lines.append(f"  (on {gpu}, tritondeconv's kernels ran in the Triton interpreter and the cuDNN "
                         "columns are PyTorch's CPU convolution)")
    write_markdown(out_dir / "bench.md", rows, "\n".join(lines))


class Budget:
    """A stage's time budget (``None``: none).  Spent once ``seconds`` have passed since
    it was made, by the wall clock, or, in a rehearsal of the GPU run (``fake_step``), by
    a clock that advances ``fake_step`` seconds per finished job instead."""

    def __init__(self, seconds: float | None, fake_step: float | None = None):
        self.seconds, self.fake_step = seconds, fake_step
        self._start, self._faked = time.monotonic(), 0.0

    def elapsed(self) -> float:
        return self._faked if self.fake_step is not None else time.monotonic() - self._start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    def job_done(self) -> None:
        if self.fake_step is not None:
            self._faked += self.fake_step


def jobs_of(a: argparse.Namespace) -> list[tuple]:
    """The (cell, dtype, layout, pass) asked for, in the order they are measured."""
    suites = QUICK_SUITES if a.quick else SUITES
    suite = [cell for suite_name in a.suites.split(",") for cell in suites[suite_name]
             if not a.cells or any(part in cell.label for part in a.cells.split(","))]
    dtypes = ["fp32"] if a.quick else a.dtypes.split(",")
    layouts, passes = a.layouts.split(","), a.passes.split(",")
    return [(c, d, lay, p) for p in passes for c in suite for d in dtypes for lay in layouts if lay in LAYOUTS[c.rank]]


def measure(a: argparse.Namespace, device: str, name: str, sink: CsvSink) -> int:
    """Measure the roofs, then every job asked for, with progress, each row into
    ``sink`` as it is measured, until the jobs or ``a.budget`` run out.  Returns how
    many jobs were measured."""
    budget = Budget(a.budget, a.fake_clock)
    peaks, bandwidth = measure_peaks(device, a.quick)
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device == "cuda":
        versions += f", cuDNN {torch.backends.cudnn.version()}"
    print(f"{name}: {versions}; matmul peak " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items())
          + f"; copy {bandwidth:.0f} GB/s", flush=True)
    print(f"running {where_kernels_run(device, name)}", flush=True)

    jobs = jobs_of(a)
    methods = a.methods.split(",")
    for i, (cell, dtype_name, layout, pass_) in enumerate(jobs, 1):
        if budget.spent():
            print(f"budget of {a.budget:g} s spent: stopped after {i - 1} of {len(jobs)} cells", flush=True)
            return i - 1
        flops, nbytes = roofline(cell, dtype_name, pass_)
        bound_ms = max(flops / (peaks[dtype_name] * 1e12), nbytes / (bandwidth * 1e9)) * 1e3
        summary = []
        for r in run_cell(cell, dtype_name, layout, pass_, device, methods, a.back_to_back):
            r.update(gpu=name, rank=f"{cell.rank}-D", shape=cell.label, dtype=dtype_name, layout=layout,
                     **{"pass": pass_},
                     tflops=flops / (r["median_ms"] * 1e-3) / 1e12, gbps=nbytes / (r["median_ms"] * 1e-3) / 1e9,
                     pct_roofline=100 * bound_ms / r["median_ms"], versions=versions,
                     peak_tflops=peaks[dtype_name], copy_gbps=bandwidth, date=datetime.date.today().isoformat())
            sink.write(r)
            summary.append(f"{r['method']} {r['median_ms']:.3f} ms")
        print(f"[{i}/{len(jobs)}] {cell.label} {dtype_name} {layout} {pass_}: {', '.join(summary)}", flush=True)
        budget.job_done()
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one dtype: a smoke run of the harness")
    ap.add_argument("--suites", default="2d,1d,3d",
                    help="which suites: 2d, 1d, 3d, small (host-bound decoder layers), classes (depthwise, grouped "
                         "and few-output-channel layers)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--layouts", default="nchw,channels_last", help="(1-D inputs have only nchw)")
    ap.add_argument("--passes", default="fwd,fwd+bwd",
                    help="fwd, fwd+bwd (fwd+bwd-inline: the backward on the calling thread, not the autograd "
                         "engine's device thread), and the backward's parts alone: dgrad (input gradient), wgrad "
                         "(weight gradient)")
    ap.add_argument("--cells", default="", help="only the cells whose label contains one of these (comma-separated)")
    ap.add_argument("--back-to-back", type=int, default=0, metavar="N",
                    help="also time N calls in a row per method, the methods alternating (host time included), "
                         "and on a GPU the kernels' own time (torch.profiler) and a CUDA graph's replay")
    ap.add_argument("--methods", default=",".join(METHODS), help="which methods to time (comma-separated)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="stop after the cell in progress once this many seconds have passed")
    ap.add_argument("--fake-clock", type=float, metavar="SECONDS",
                    help="rehearsal: the budget counts SECONDS per finished cell instead of the wall clock")
    ap.add_argument("--out", type=Path, help="results folder (default perf/results/<gpu-name>)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of the bench.csv already there that this run does not re-measure")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="CSV",
                    help="measure nothing: merge these bench.csv files (later ones win) into --out")
    a = ap.parse_args(argv)

    unknown = set(a.methods.split(",")) - {*METHODS, *VARIANTS}
    if unknown:
        ap.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join((*METHODS, *VARIANTS))}")
    device, name, out_dir = setup(a.out, measuring=not a.merge, quick=a.quick)
    csv_path = out_dir / "bench.csv"
    earlier = read_csv(csv_path) if a.append and csv_path.exists() else []

    if a.merge:
        rows = []
        for path in a.merge:
            rows = merge(rows, read_csv(path))
        sink = CsvSink(csv_path, merge(earlier, rows))
        sink.close()
    else:
        # Earlier rows stay unless this run re-measures their (shape, dtype, layout, pass):
        # those of jobs the budget leaves unreached are written back at the end.
        asked = {(c.label, d, lay, p) for c, d, lay, p in jobs_of(a)}
        sink = CsvSink(csv_path, [r for r in earlier if (r["shape"], r["dtype"], r["layout"], r["pass"]) not in asked])
        with tempfile.TemporaryDirectory(prefix="tritondeconv-tuning-") as fresh_cache:
            if not os.environ.get("TRITONDECONV_CACHE_DIR"):  # start from no tuning, to time it
                os.environ["TRITONDECONV_CACHE_DIR"] = fresh_cache
                os.environ["TRITONDECONV_SHIPPED_TUNINGS"] = "0"
            try:
                measure(a, device, name, sink)
            finally:
                measured = {(r["shape"], r["dtype"], r["layout"], r["pass"]) for r in sink.rows}
                for r in earlier:
                    if (r["shape"], r["dtype"], r["layout"], r["pass"]) in asked - measured:
                        sink.write(r)
                sink.close()
                if sink.rows:  # the configurations chosen, for the record
                    for cache_file in Path(tuning.cache_dir()).glob("*.json"):
                        shutil.copy(cache_file, out_dir / cache_file.name)
    if not sink.rows:
        print("nothing measured, nothing written")
        return 0
    write_results(out_dir, sink.rows)
    print(f"wrote {csv_path} and {out_dir / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
