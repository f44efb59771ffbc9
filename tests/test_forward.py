"""conv_transpose2d and naive_conv_transpose2d against PyTorch, over the argument space.

Every test draws fresh random inputs, poisons the op's output with NaN, and compares
with PyTorch's conv_transpose2d in float64 by relative error (reference.TOLERANCES).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import DTYPES, assert_close, fresh_seed, layout, reference, same_layout

import tritondeconv
import tritondeconv.backends
from tritondeconv.kernels.common import INTERPRETING, observe_launches

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

OPS = {"conv_transpose2d": tritondeconv.conv_transpose2d, "naive": tritondeconv.naive_conv_transpose2d}


def _geometries():
    """(kernel, stride, dilation, padding, output_padding): k 1-5, s 1-3, d 1-2, padding
    none and about half the dilated kernel, output_padding none and the largest allowed."""
    for k, s, d in itertools.product(range(1, 6), range(1, 4), range(1, 3)):
        for p, op in itertools.product(sorted({0, (d * (k - 1) + 1) // 2}), sorted({0, max(s, d) - 1})):
            yield pytest.param(k, s, d, p, op, id=f"k{k}-s{s}-d{d}-p{p}-op{op}")


def run_case(op, device, precision, x_shape, w_shape, *, bias=True, kind="nchw", stride=1, padding=0,
             output_padding=0, groups=1, dilation=1):
    """Draw inputs, run ``op`` and PyTorch, and compare."""
    seed = fresh_seed()
    dtype = DTYPES[precision]
    x = (layout(torch.randn(x_shape, device=device).to(dtype), kind) if len(x_shape) == 4
         else torch.randn(x_shape, device=device).to(dtype))
    w = torch.randn(w_shape, device=device).to(dtype)
    b = torch.randn(w_shape[1] * groups, device=device).to(dtype) if bias else None
    out = OPS[op](x, w, b, stride, padding, output_padding, groups, dilation)
    assert_close(out, reference(x, w, b, stride, padding, output_padding, groups, dilation), precision, seed)
    # laid out as PyTorch lays out its output (the input's memory format and the weight's)
    assert same_layout(out, F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation))
    return x, out


@pytest.mark.interpreter_subset(
    {"precision": "float64"},
    reason="interpreter suite: the geometry grid runs in float64 on CPU; test_dtypes covers the others")
@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("k, s, d, p, op_", list(_geometries()))
def test_geometry(device, precision, op, k, s, d, p, op_):
    run_case(op, device, precision, (2, 3, 4, 5), (3, 2, k, k), stride=s, padding=p, output_padding=op_, dilation=d)


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", ["1", "2", "depthwise"])
@pytest.mark.parametrize("k, s, p, op_", [(3, 2, 1, 1), (4, 2, 1, 0)], ids=["k3s2p1op1", "k4s2p1"])
def test_groups_bias_layouts(device, precision, kind, bias, groups, k, s, p, op_):
    c_in, c_out_g, g = {"1": (4, 3, 1), "2": (4, 3, 2), "depthwise": (4, 1, 4)}[groups]
    x, out = run_case("conv_transpose2d", device, precision, (2, c_in, 4, 3), (c_in, c_out_g, k, k),
                      bias=bias, kind=kind, stride=s, padding=p, output_padding=op_, groups=g)


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "kernel, stride, padding, output_padding, dilation",
    [
        ((2, 3), (1, 2), (0, 1), (0, 1), (1, 1)),
        ((3, 5), (3, 2), (1, 2), (2, 1), (1, 2)),
        ((1, 4), (2, 3), (0, 1), (1, 0), (2, 1)),
        ((5, 2), (2, 1), (2, 0), (0, 0), (1, 2)),
    ],
    ids=["k2x3", "k3x5", "k1x4", "k5x2"],
)
def test_rectangular(device, precision, kind, op, kernel, stride, padding, output_padding, dilation):
    run_case(op, device, precision, (1, 3, 3, 6), (3, 2, *kernel), kind=kind, stride=stride, padding=padding,
             output_padding=output_padding, dilation=dilation)


@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("k, s, p, op_", [(3, 2, 1, 1), (4, 2, 1, 0)], ids=["k3s2p1op1", "k4s2p1"])
def test_dtypes(device, precision, kind, k, s, p, op_):
    # Channel counts that are not multiples of the tiles, and a reduction long enough
    # for low-precision rounding to show.
    n, c_in, c_out, size = (2, 20, 6, 4) if device == "cpu" else (4, 72, 40, 9)
    run_case("conv_transpose2d", device, precision, (n, c_in, size, size + 1), (c_in, c_out, k, k),
             kind=kind, stride=s, padding=p, output_padding=op_)


@pytest.mark.only_on("cpu", reason="test_dtypes runs this shape on CUDA")
@pytest.mark.parametrize("precision", ["bfloat16"], indirect=True)
def test_dtypes_at_the_gpu_tests_shape(device, precision):
    """test_dtypes' CUDA geometry (4x72x9x10 -> 40 channels, k4 s2 p1, channels_last) in
    the interpreter as well, so the GPU test's own shape is checked on every CI run (in
    bf16, the GPU's dtype; the interpreter takes most of a minute for it)."""
    run_case("conv_transpose2d", device, precision, (4, 72, 9, 10), (72, 40, 4, 4), kind="channels_last",
             stride=2, padding=1)


@pytest.mark.interpreter_subset({"precision": "float64", "k": 16},
                                reason="interpreter suite: k16s8 in float64 (1024 phases take 30 s in the interpreter)")
@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("k, s, p, size", [(16, 8, 4, 3), (64, 32, 16, 2)], ids=["FCN-k16s8p4", "k64s32p16"])
def test_large_kernel_and_stride(device, precision, k, s, p, size):
    """FCN's upsampling geometries: 64 and 1024 phases of 2x2 taps each."""
    c_in, c_out = (3, 2) if device == "cpu" else (21, 21)
    run_case("conv_transpose2d", device, precision, (2, c_in, size, size + 1), (c_in, c_out, k, k),
             kind="channels_last", stride=s, padding=p)


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("op", list(OPS))
def test_unbatched(device, precision, op):
    _, out = run_case(op, device, precision, (3, 4, 5), (3, 2, 3, 3), stride=2, padding=1, output_padding=1)
    assert out.dim() == 3


@pytest.mark.no_kernel("an empty batch has nothing to launch for")
@pytest.mark.parametrize("op", list(OPS))
def test_empty_batch(device, op):
    x = torch.randn(0, 3, 4, 5, device=device, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64)
    out = OPS[op](x, w, None, 2, 1, 1)
    assert out.shape == reference(x, w, None, 2, 1, 1, 1, 1).shape == (0, 2, 8, 10)


def test_empty_batch_gradients(device):
    """An empty batch's gradients are PyTorch's: an empty input gradient, and zero weight
    and bias gradients (the weight gradient's kernel reduces over no pixel)."""
    x = torch.randn(0, 3, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1).sum(), (x, w, b))
    expected = torch.autograd.grad(reference(x, w, b, 2, 1, 1, 1, 1).sum(), (x, w, b))
    for got, want in zip(ours, expected):
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.skipif(not INTERPRETING, reason="CPU tensors fall back to aten without TRITON_INTERPRET=1")
def test_cpu_runs_the_triton_kernel():
    """Under TRITON_INTERPRET=1 the CPU tests exercise the Triton kernel, not aten's fallback."""
    x, w = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with observe_launches() as launches:
        for op in OPS.values():
            op(x, w, None, 2)
    assert [launch.kernel for launch in launches] == ["phase_gemm"] * len(OPS)
