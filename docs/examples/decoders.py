"""A worked example: take two real decoders written with plain PyTorch modules, convert
them, check them against the originals, train a few steps, compile, and (on a GPU) time
them.

    python docs/examples/decoders.py            # on a GPU: full size, timed against the originals
    TRITON_INTERPRET=1 python docs/examples/decoders.py --toy   # on a CPU: toy size (a 16x16
                                                                 # generator), in the interpreter

The decoders: a DCGAN generator (a latent vector up to a 64x64 RGB image: transposed
convolutions, batch norm, ReLU, tanh) and a U-Net decoder whose upsampling blocks
concatenate a skip connection.  Nothing in them knows about tritondeconv:
``tritondeconv.convert`` swaps their ``nn.ConvTranspose2d`` modules for ours in place.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn

import tritondeconv
from tritondeconv.kernels.common import observe_launches


def dcgan_generator(nz: int, ngf: int, image_size: int = 64) -> nn.Module:
    """DCGAN's generator (Radford et al.): 1x1 -> 4x4 -> 8x8 -> ... -> ``image_size``
    (64 in the paper), each step a k4 s2 p1 transposed convolution."""
    def block(c_in, c_out, stride, padding):
        return [nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
    doublings = image_size.bit_length() - 4  # 4x4 -> image_size/2 by blocks, the last layer to image_size
    widths = [ngf * 2 ** (doublings - i) for i in range(doublings + 1)]
    layers = block(nz, widths[0], 1, 0)
    for c_in, c_out in zip(widths, widths[1:]):
        layers += block(c_in, c_out, 2, 1)
    return nn.Sequential(*layers, nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh())


class UNetDecoder(nn.Module):
    """A U-Net's decoder: at each level, upsample by a 2x2 stride-2 transposed
    convolution, concatenate the encoder's skip tensor, and convolve twice."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, 2) for c in channels[:-1])
        self.convs = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(True), nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.ReLU(True))
            for c in channels[:-1])
        self.head = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for up, conv, skip in zip(self.ups, self.convs, skips):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def unet_inputs(batch: int, channels: tuple[int, ...], size: int, device, dtype):
    x = torch.randn(batch, channels[0], size, size, device=device, dtype=dtype)
    skips = [torch.randn(batch, c // 2, size * 2 ** (i + 1), size * 2 ** (i + 1), device=device, dtype=dtype)
             for i, c in enumerate(channels[:-1])]
    return x, skips


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(name: str, original: nn.Module, inputs: tuple, tolerance: float, steps: int, compile_backend: str) -> None:
    """Convert a copy of ``original``, compare forward, train both ``steps`` SGD steps
    side by side, then compile the converted one and compare again."""
    ours = tritondeconv.convert(copy.deepcopy(original))
    with observe_launches() as launches:
        out = ours(*inputs)
    err = relative_error(out, original(*inputs))
    assert err <= tolerance, f"{name}: converted model off by {err:.2e}"
    print(f"{name}: {len(launches)} Triton launches in one forward; relative error against the original {err:.1e}")

    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (original, ours)]
    for step in range(steps):
        losses = []
        for model, optimizer in zip((original, ours), optimizers):
            optimizer.zero_grad()
            loss = model(*inputs).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= tolerance * abs(losses[0]) + 1e-12, f"{name}: step {step} losses {losses}"
    print(f"{name}: {steps} training steps with the same losses as the original (last {losses[1]:.6f})")

    compiled = torch.compile(ours, backend=compile_backend, fullgraph=True)
    with torch.no_grad():
        err = relative_error(compiled(*inputs), original(*inputs))
    assert err <= tolerance, f"{name}: compiled model off by {err:.2e}"
    print(f"{name}: torch.compile(fullgraph=True, backend={compile_backend!r}) agrees ({err:.1e})")


def timed(name: str, original: nn.Module, inputs: tuple) -> None:
    """Forward time of the original and the converted model (median of do_bench)."""
    import triton

    ours = tritondeconv.convert(copy.deepcopy(original))
    with torch.no_grad():
        ours(*inputs)  # the first call tunes each layer
        times = [triton.testing.do_bench(lambda m=m: m(*inputs), return_mode="median") for m in (original, ours)]
    print(f"{name}: forward {times[0]:.3f} ms with PyTorch's modules, {times[1]:.3f} ms converted "
          f"({times[0] / times[1]:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny decoders (CPU, interpreter): what CI runs")
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not a.toy
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float64)
    torch.manual_seed(0)
    nz, ngf, batch, image = (100, 64, 64, 64) if gpu else (8, 2, 2, 16)
    channels, size = ((512, 256, 128, 64), 16) if gpu else ((16, 8, 4), 2)
    generator = dcgan_generator(nz, ngf, image).to(device, dtype).train()
    unet = UNetDecoder(channels).to(device, dtype).train()
    z = (torch.randn(batch, nz, 1, 1, device=device, dtype=dtype),)
    unet_in = unet_inputs(2 if not gpu else 16, channels, size, device, dtype)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-9
    backend = "inductor" if gpu else "aot_eager"
    check("DCGAN generator", generator, z, tolerance, steps=2, compile_backend=backend)
    check("U-Net decoder", unet, unet_in, tolerance, steps=2, compile_backend=backend)
    if gpu:
        timed("DCGAN generator", generator.eval(), z)
        timed("U-Net decoder", unet.eval(), unet_in)
    return 0


if __name__ == "__main__":
    sys.exit(main())
