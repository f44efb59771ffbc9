"""Run one DCGAN-shaped layer through tritondeconv and check it against PyTorch.

    python -m tritondeconv.demo

On a GPU: the full layer (128x512x4x4 -> 256, k4 s2 p1), timed against the naive
zero-insertion op and cuDNN.  Without one: a smaller layer of the same geometry on CPU
tensors, which only the Triton interpreter can run through the real kernel (slow, so
untimed).

Triton reads ``TRITON_INTERPRET`` when the kernels are defined, and ``python -m`` imports
the package (and so the kernels) before this module runs: setting the variable here would
be too late.  So without a GPU, when the kernels were defined for the compiler, the demo
runs itself again in a fresh process with ``TRITON_INTERPRET=1`` (once: the child carries
a marker).  What it then reports as having run comes from the launches it observed
(``kernels.common.observe_launches``), never from what it meant to run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import torch
import torch.nn.functional as F

import tritondeconv
from tritondeconv.backends import runs_triton
from tritondeconv.kernels.common import INTERPRETING, Launch, observe_launches
from tritondeconv.kernels.planner import plan

KERNEL, STRIDE, PADDING = 4, 2, 1
# The relative error against float64 the result must meet, per dtype (float16 on a GPU,
# float32 on the CPU).
TOLERANCE = {torch.float16: 2e-3, torch.float32: 1e-5}
HAS_GPU = torch.cuda.is_available()
# Set in the environment of the process the demo starts, so that it never starts another.
RERUN_MARKER = "TRITONDECONV_DEMO_RERUN"


def should_rerun_in_interpreter() -> bool:
    """Whether to run the demo again with ``TRITON_INTERPRET=1``: there is no GPU, the
    kernels were defined for the compiler only because nobody set ``TRITON_INTERPRET``
    (an explicit value is the user's choice, and is kept), and this process is not
    already such a rerun."""
    return (not HAS_GPU and not INTERPRETING and not os.environ.get("TRITON_INTERPRET")
            and not os.environ.get(RERUN_MARKER))


def rerun_in_interpreter(argv: list[str]) -> int:
    """Run ``python -m tritondeconv.demo`` in a fresh process whose kernels are defined
    for the Triton interpreter; its output is this demo's.  Returns its exit status."""
    print("no GPU, and the kernels were imported without TRITON_INTERPRET=1 (CPU tensors would fall back to aten): "
          "running the demo again in a fresh process with TRITON_INTERPRET=1", flush=True)
    env = {**os.environ, "TRITON_INTERPRET": "1", RERUN_MARKER: "1"}
    return subprocess.run([sys.executable, "-m", "tritondeconv.demo", *argv], env=env).returncode


def describe_launches(launches: list[Launch], where: str) -> str:
    """``launches`` as one phrase, e.g. ``Triton kernel phase_gemm (1 launch) in the
    Triton interpreter``."""
    counts = Counter(launch.kernel for launch in launches)
    kernels = ", ".join(f"{kernel} ({n} launch{'es' if n > 1 else ''})" for kernel, n in counts.items())
    return f"Triton kernel{'s' if len(counts) > 1 else ''} {kernels} {where}"


def main() -> int:
    """Run, check and describe the layer; returns 1 if the result is not PyTorch's (to
    ``TOLERANCE``) or if the Triton kernel was expected to run but did not launch (the
    result then came from aten), else 0."""
    compiled = HAS_GPU and not INTERPRETING
    if compiled:
        device, dtype, (n, c_in, size, c_out) = "cuda", torch.float16, (128, 512, 4, 256)
        device_name = torch.cuda.get_device_name()
    else:
        device, dtype, (n, c_in, size, c_out) = "cpu", torch.float32, (2, 32, 8, 16)
        device_name = "CPU"
    print(f"layer: {n}x{c_in}x{size}x{size} -> {c_out} channels, kernel {KERNEL}, stride {STRIDE}, "
          f"padding {PADDING}, {dtype} on {device_name}")
    x = torch.randn(n, c_in, size, size, device=device, dtype=dtype)
    w = torch.randn(c_in, c_out, KERNEL, KERNEL, device=device, dtype=dtype) / (c_in * KERNEL) ** 0.5
    b = torch.randn(c_out, device=device, dtype=dtype)

    with observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, b, STRIDE, PADDING)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), STRIDE, PADDING)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"output {list(out.shape)}; relative error against PyTorch in float64: {err:.2e}")
    correct = err <= TOLERANCE[dtype]
    if not correct:
        print(f"check: FAILED, the relative error is above {TOLERANCE[dtype]:.0e}, what {dtype} allows")

    expected = runs_triton(torch.device(device))
    if launches:
        where = "in the Triton interpreter" if INTERPRETING else f"compiled for {device_name}"
        print(f"ran: {describe_launches(launches, where)}")
    elif expected:
        print(f"ran: aten fallback: no Triton kernel launched, although tritondeconv runs its kernels on {device_name} "
              "tensors here; this demo did not show the kernel")
    else:
        setting = os.environ.get("TRITON_INTERPRET")
        print("ran: aten fallback (no Triton kernel launched): on CPU the kernels run only in the Triton interpreter, "
              f"and TRITON_INTERPRET was {'unset' if setting is None else repr(setting)} when they were imported")

    p = plan((size, size), (KERNEL,) * 2, (STRIDE,) * 2, (PADDING,) * 2, (1, 1), (0, 0))
    macs = p.macs(n, c_in, c_out)
    print(f"multiply-adds: naive zero-insertion {macs['naive']:,}, decomposed {macs['decomposed']:,} "
          f"({macs['naive'] / macs['decomposed']:.2f}x fewer)")

    if compiled and launches:
        from triton.testing import do_bench

        torch.backends.cudnn.benchmark = True
        times = {
            "tritondeconv": do_bench(lambda: tritondeconv.conv_transpose2d(x, w, b, STRIDE, PADDING)),
            "naive (zero insertion)": do_bench(lambda: tritondeconv.naive_conv_transpose2d(x, w, b, STRIDE, PADDING)),
            "cuDNN": do_bench(lambda: F.conv_transpose2d(x, w, b, STRIDE, PADDING)),
        }
        for name, ms in times.items():
            print(f"  {name:24s} {ms:8.3f} ms  ({ms / times['tritondeconv']:.2f}x tritondeconv's time)")
    elif compiled:
        print("no timings: the Triton kernel did not launch")
    elif HAS_GPU:
        print("no timings: TRITON_INTERPRET=1 runs the kernels in the interpreter; timings are of compiled kernels")
    else:
        print("no GPU: timings are shown only on a GPU")
    return 1 if (expected and not launches) or not correct else 0


if __name__ == "__main__":
    sys.exit(rerun_in_interpreter(sys.argv[1:]) if should_rerun_in_interpreter() else main())
