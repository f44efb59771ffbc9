"""Host time per call: our Python on the way to a kernel launch, beside aten's whole call
on the same tensors.

    python perf/host_overhead.py [--repeat 2000] [--device cpu|cuda]

The Triton launch is replaced through the launcher's seam (``kernels.launcher.intercept``)
by a no-op, so what is timed is everything before it: argument checks, the PyTorch
dispatcher, planning, the tuning lookup, weight packing, allocation.  The tensors are
small (1×8×4×4, 8 → 8 channels, k4 s2 p1), so aten's own call is mostly host time too.
Reports the median of ``--repeat`` calls, one thread:

* the functional API and a module, forward (no grad) and forward+backward, each beside
  aten's, and their ratio (the targets: forward ≤ 0.5× aten, forward+backward ≤ 0.7×);
* the forward's parts: the public function's own layer (argument parsing), the PyTorch
  dispatcher (the op called through ``torch.ops`` against its implementation called
  directly), our implementation (checks, planning, tuning lookup, packing, allocation),
  and on a GPU the launch itself (Triton binding the kernel's arguments and the driver
  call: the implementation with the real launch against the no-op one).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.ops import IMPLEMENTATIONS

NO_LAUNCH = dict(launch=lambda request, config: None, tune=False)


def _median_us(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def _tensors(device: str):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, device=device)
    w = torch.randn(8, 8, 4, 4, device=device)
    b = torch.randn(8, device=device)
    return x, w, b


def measure(repeat: int, device: str = "cpu") -> list[tuple[str, float, float]]:
    """(case, our µs, aten's µs) per case, the launches replaced by a no-op."""
    x, w, b = _tensors(device)
    ours_module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    aten_module = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()

    def backward(fn):
        def run():
            fn(xg).sum().backward()
        return run

    cases = {
        "functional forward": (lambda: tritondeconv.conv_transpose2d(x, w, b, 2, 1),
                               lambda: F.conv_transpose2d(x, w, b, 2, 1)),
        "module forward": (lambda: ours_module(x), lambda: aten_module(x)),
        "module forward+backward": (backward(ours_module), backward(aten_module)),
    }
    rows = []
    for name, (ours, aten) in cases.items():
        with torch.set_grad_enabled(name.endswith("backward")):
            with launcher.intercept(**NO_LAUNCH):
                ours_us = _median_us(ours, repeat)
            rows.append((name, ours_us, _median_us(aten, repeat)))
    return rows


def parts(repeat: int, device: str = "cpu") -> list[tuple[str, float]]:
    """(part, µs) of one forward call without grad: each layer's own time."""
    x, w, b = _tensors(device)
    geometry = ([2, 2], [1, 1], [0, 0], 1, [1, 1])
    op = torch.ops.tritondeconv.conv_transpose.default
    implementation = IMPLEMENTATIONS["tritondeconv::conv_transpose"]
    with torch.no_grad():
        with launcher.intercept(**NO_LAUNCH):
            public = _median_us(lambda: tritondeconv.conv_transpose2d(x, w, b, 2, 1), repeat)
            dispatched = _median_us(lambda: op(x, w, b, *geometry), repeat)
            direct = _median_us(lambda: implementation(x, w, b, *geometry), repeat)
        rows = [("public function's layer (parsing)", public - dispatched),
                ("PyTorch dispatcher and our autograd kernel", dispatched - direct),
                ("our implementation (checks, plan, tuning lookup, packing, allocation)", direct)]
        if device == "cuda":
            launched = _median_us(lambda: implementation(x, w, b, *geometry), repeat)
            rows.append(("Triton's launch (argument binding, driver)", launched - direct))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("host_overhead: --device cuda needs a CUDA GPU; this machine has none (use --device cpu)")
        return 2
    torch.set_num_threads(1)  # tiny tensors: one thread, and no spinning workers to skew the clock
    print(f"torch {torch.__version__}; {a.device}; median of {a.repeat} calls; the launch itself replaced by a no-op")
    print("| call | ours µs | aten µs | ours / aten |")
    print("| --- | --- | --- | --- |")
    for name, ours, aten in measure(a.repeat, a.device):
        print(f"| {name} | {ours:.1f} | {aten:.1f} | {ours / aten:.2f} |")
    print()
    print("| part of a forward call | µs |")
    print("| --- | --- |")
    for name, us in parts(a.repeat, a.device):
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
