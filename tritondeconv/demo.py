"""Run one DCGAN-shaped layer through tritondeconv and check it against PyTorch.

    python -m tritondeconv.demo

On a GPU: the full layer (128x512x4x4 -> 256, k4 s2 p1), timed against the naive
zero-insertion op and cuDNN.  Without one: a smaller layer of the same geometry,
run by the Triton interpreter (the real kernel, on CPU tensors; slow, so untimed).
"""
from __future__ import annotations

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # The interpreter must be chosen before the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import tritondeconv  # noqa: E402
from tritondeconv.planner import plan  # noqa: E402

KERNEL, STRIDE, PADDING = 4, 2, 1


def main() -> None:
    if HAS_GPU:
        device, dtype, (n, c_in, size, c_out) = "cuda", torch.float16, (128, 512, 4, 256)
    else:
        device, dtype, (n, c_in, size, c_out) = "cpu", torch.float32, (2, 32, 8, 16)
    print(f"layer: {n}x{c_in}x{size}x{size} -> {c_out} channels, kernel {KERNEL}, stride {STRIDE}, "
          f"padding {PADDING}, {dtype} on {torch.cuda.get_device_name() if HAS_GPU else 'CPU (Triton interpreter)'}")
    x = torch.randn(n, c_in, size, size, device=device, dtype=dtype)
    w = torch.randn(c_in, c_out, KERNEL, KERNEL, device=device, dtype=dtype) / (c_in * KERNEL) ** 0.5
    b = torch.randn(c_out, device=device, dtype=dtype)

    out = tritondeconv.conv_transpose2d(x, w, b, STRIDE, PADDING)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), STRIDE, PADDING)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"output {list(out.shape)}; relative error against PyTorch in float64: {err:.2e}")

    p = plan((size, size), (KERNEL,) * 2, (STRIDE,) * 2, (PADDING,) * 2, (1, 1), (0, 0))
    macs = p.macs(n, c_in, c_out)
    print(f"multiply-adds: naive zero-insertion {macs['naive']:,}, decomposed {macs['decomposed']:,} "
          f"({macs['naive'] / macs['decomposed']:.2f}x fewer)")

    if HAS_GPU:
        from triton.testing import do_bench

        torch.backends.cudnn.benchmark = True
        times = {
            "tritondeconv": do_bench(lambda: tritondeconv.conv_transpose2d(x, w, b, STRIDE, PADDING)),
            "naive (zero insertion)": do_bench(lambda: tritondeconv.naive_conv_transpose2d(x, w, b, STRIDE, PADDING)),
            "cuDNN": do_bench(lambda: F.conv_transpose2d(x, w, b, STRIDE, PADDING)),
        }
        for name, ms in times.items():
            print(f"  {name:24s} {ms:8.3f} ms  ({ms / times['tritondeconv']:.2f}x tritondeconv's time)")
    else:
        print("no GPU: timings are shown only on a GPU")


if __name__ == "__main__":
    main()
