"""Host time per call: our Python on the way to a kernel launch, beside aten's whole call
on the same tensors.

    python perf/host_overhead.py [--repeat 2000]

The Triton launch is replaced through the launcher's seam (``kernels.launcher.intercept``)
by a no-op, so what is timed is everything before it: argument checks, the PyTorch
dispatcher, planning, the tuning lookup, weight packing, allocation.  The tensors are
small CPU tensors, so aten's own call is mostly host time too.  Reports the median of
``--repeat`` calls for the functional API and a module, forward and forward+backward,
each beside aten's, and their ratio (the targets: forward ≤ 0.5× aten, forward+backward
≤ 0.7×).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # nothing runs: the launches are replaced

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tritondeconv  # noqa: E402
from tritondeconv.kernels import launcher  # noqa: E402


def _median_us(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure(repeat: int) -> list[tuple[str, float, float]]:
    """(case, our µs, aten's µs) per case."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: one thread, and no spinning workers to skew the clock
    x = torch.randn(1, 8, 4, 4)
    w = torch.randn(8, 8, 4, 4)
    b = torch.randn(8)
    ours_module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1)
    aten_module = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1)
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
    with launcher.intercept(launch=lambda request, config: None, tune=False), torch.no_grad():
        for name in ("functional forward", "module forward"):
            ours, aten = cases[name]
            rows.append((name, _median_us(ours, repeat), _median_us(aten, repeat)))
    with launcher.intercept(launch=lambda request, config: None, tune=False):
        ours, aten = cases["module forward+backward"]
        rows.append(("module forward+backward", _median_us(ours, repeat), _median_us(aten, repeat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}; median of {a.repeat} calls; the launch itself replaced by a no-op")
    print("| call | ours µs | aten µs | ours / aten |")
    print("| --- | --- | --- | --- |")
    for name, ours, aten in measure(a.repeat):
        print(f"| {name} | {ours:.1f} | {aten:.1f} | {ours / aten:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
