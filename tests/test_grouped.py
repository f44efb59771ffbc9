"""Layers of few channels per group on channels-last input (depthwise ones among them):
the kernel that puts the groups side by side as a tile's columns, in both directions
it computes (the forward and the input gradient), every rank, dtype, epilogue and index
width; and the race that decides, once per shape, between it and the phase GEMM."""
import contextlib

import pytest
import torch
from reference import DTYPES, assert_close, fresh_seed, layout, reference

import tritondeconv
from tritondeconv.kernels import launcher, tuning
from tritondeconv.kernels.activations import ACTIVATIONS
from tritondeconv.kernels.common import force_int64_index, observe_launches

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"),
              pytest.mark.fma_only("the grouped kernel has one path: fewer than 16 channels per group on each side")]

FUNCTIONS = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
# Spatial sizes per rank: small (the interpreter is slow), odd and unequal.
SPATIAL = {1: (7,), 2: (5, 6), 3: (2, 3, 3)}
# (input channels per group, output channels per group): depthwise, a channel multiplier,
# two channels reduced into one, and a reduction over more channels than one unrolled
# step of the interpreter's tile takes (3: a step of 4 with one masked).
PER_GROUP = {"depthwise": (1, 1), "multiplier": (1, 2), "two-into-one": (2, 1), "three-by-three": (3, 3)}
GROUPED = (("grouped", True),)  # the launcher's ``only``: the grouped kernel wherever it is offered


def _layer(rank: int, per_group: str, groups: int, dtype: torch.dtype, device: str):
    """Channels-last input, weight and bias (all requiring gradients) of a layer with
    ``groups`` groups of ``PER_GROUP[per_group]`` channels."""
    c_in_g, c_out_g = PER_GROUP[per_group]
    x = layout(torch.randn(2, groups * c_in_g, *SPATIAL[rank], device=device).to(dtype), "channels_last")
    w = torch.randn(groups * c_in_g, c_out_g, *(3,) * rank, device=device).to(dtype)
    b = torch.randn(groups * c_out_g, device=device).to(dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def _directions(launches) -> set:
    """The grouped launches' directions (True: the transposed forward; False: the direct
    convolution of the input gradient)."""
    return {launch.constants["TRANSPOSED"] for launch in launches if launch.kernel == "grouped"}


@pytest.mark.interpreter_subset({"precision": "float64"}, {"precision": "bfloat16"}, {"rank": 2},
                                reason="the interpreter runs every rank in float64 and bfloat16, the others in 2-D")
@pytest.mark.parametrize("per_group", list(PER_GROUP))
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_forward_and_gradients_with_the_groups_side_by_side(device, precision, rank, per_group):
    """The forward and the input gradient on the grouped kernel (the weight and bias
    gradients on theirs), stride 2, padding 1, output padding 1, against PyTorch in
    float64, on every rank and dtype."""
    seed = fresh_seed()
    x, w, b = _layer(rank, per_group, 5, DTYPES[precision], device)
    with launcher.intercept(only=GROUPED), observe_launches() as launches:
        out = FUNCTIONS[rank](x, w, b, 2, 1, 1, 5)
        gy = layout(torch.randn(out.shape, device=device).to(out.dtype), "channels_last")  # (as PyTorch's 2-D and 3-D)
        got = torch.autograd.grad(out, (x, w, b), gy)
    assert _directions(launches) == {True, False}
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference(x64, w64, b64, 2, 1, 1, 5, 1)
    assert_close(out, ref.detach(), precision, seed)
    for ours, theirs in zip(got, torch.autograd.grad(ref, (x64, w64, b64), gy.double())):
        assert_close(ours, theirs, precision, seed)


@pytest.mark.interpreter_subset({"activation": "gelu"}, {"precision": "float32", "int64": False},
                                reason="the interpreter runs every dtype and index width with gelu (the longest "
                                       "epilogue), every activation in fp32")
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_epilogue_geometry_and_index_width(device, precision, activation, int64):
    """An activation and a residual fused into the grouped kernel's store, with dilation
    2 and stride 3 (phases without taps), in every dtype and both index widths; and the
    input gradient of the same geometry."""
    seed = fresh_seed()
    dtype = DTYPES[precision]
    x, w, b = _layer(2, "multiplier", 6, dtype, device)
    ref = reference(x, w, b, 3, 2, 1, 6, 2)
    r = torch.randn(ref.shape, device=device).to(dtype)
    with launcher.intercept(only=GROUPED), observe_launches() as launches, \
            force_int64_index() if int64 else contextlib.nullcontext():
        out = tritondeconv.conv_transpose2d(x, w, b, 3, 2, 1, 6, 2, activation=activation, negative_slope=0.2,
                                            residual=r)
        (grad_x,) = torch.autograd.grad(tritondeconv.conv_transpose2d(x, w, None, 3, 2, 1, 6, 2), x,
                                        layout(r, "channels_last"))
    assert _directions(launches) == {True, False}
    assert {launch.constants["INT64_INDEX"] for launch in launches if launch.kernel == "grouped"} == {int64}
    activated = {"relu": torch.relu, "leaky_relu": lambda v: torch.nn.functional.leaky_relu(v, 0.2),
                 "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
                 "sigmoid": torch.sigmoid}[activation]
    assert_close(out, activated(ref.detach()) + r.double(), precision, seed)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference(x64, w.detach().double(), None, 3, 2, 1, 6, 2), x64, r.double())
    assert_close(grad_x, expected, precision, seed)


@pytest.mark.parametrize("kind", ["nchw", "strided"])
def test_offered_only_where_the_channels_are_contiguous(device, kind):
    """On input whose channels are strided, the phase GEMM's one-column tiles already
    read along the pixels: the grouped kernel is not offered, even when asked for."""
    x = layout(torch.randn(2, 4, 5, 6, dtype=torch.float64, device=device), kind)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, device=device)
    with launcher.intercept(only=GROUPED), observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 0, 4)
    assert {launch.kernel for launch in launches} == {"phase_gemm"}
    assert_close(out, reference(x, w, None, 2, 1, 0, 4, 1), "float64", 0)


@pytest.mark.parametrize("channels", [(16, 16), (32, 2), (2, 32)], ids=["16-per-group", "wide-in", "wide-out"])
def test_not_offered_where_a_side_fills_a_tensor_core_tile(device, channels):
    """Groups of 16 channels or more on either side of the GEMM go to the phase GEMM
    (its tensor-core tiles pay there): nothing to race."""
    c_in, c_out = channels
    x = layout(torch.randn(1, 2 * c_in, 3, 3, dtype=torch.float64, device=device), "channels_last")
    w = torch.randn(2 * c_in, c_out, 2, 2, dtype=torch.float64, device=device)
    with launcher.intercept(only=GROUPED), observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 0, 0, 2)
    assert {launch.kernel for launch in launches} == {"phase_gemm"}
    assert_close(out, reference(x, w, None, 2, 0, 0, 2, 1), "float64", 0)


@pytest.mark.parametrize("winner", ["grouped", "gathered"])
def test_a_first_call_races_the_phase_gemm_and_remembers(device, first_calls, winner):
    """A depthwise layer's first call on channels-last input times the grouped kernel and
    the phase GEMM, keeps the faster (as the tuning family ``"grouping"``), and its later
    calls take that one without timing anything."""
    # (Dilated: the phase GEMM then offers one variant, so the clock times the race alone.)
    x = layout(torch.randn(2, 6, 5, 5, dtype=torch.float64, device=device), "channels_last")
    w = torch.randn(6, 1, 4, 4, dtype=torch.float64, device=device)
    ref = reference(x, w, None, 2, 1, 0, 6, 2)
    timed = []

    def clock(run):
        with observe_launches() as launched:
            run()
        side_by_side = any(launch.kernel == "grouped" for launch in launched)
        timed.append(side_by_side)
        return 0.5 if side_by_side == (winner == "grouped") else 1.0

    with launcher.intercept(tune=True, clock=clock):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 0, 6, 2)
        with observe_launches() as again:
            out2 = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 0, 6, 2)
    assert sorted(timed) == [False, True]  # each run timed once, the second call timed nothing
    assert_close(out, ref, "float64", 0)
    assert_close(out2, ref, "float64", 0)
    assert {launch.kernel for launch in again} == {"grouped" if winner == "grouped" else "phase_gemm"}
    entry = next(t for t in reversed(tuning.tuning_report()) if t.kernel == "grouping")
    assert entry.config == {"backend": winner}


def test_untuned_the_grouped_kernel_is_the_default(device):
    """Without tuning (the interpreter, ``TRITONDECONV_AUTOTUNE=0``, CUDA-graph capture)
    the race's default runs: the grouped kernel, on channels-last input."""
    x = layout(torch.randn(2, 4, 5, 5, dtype=torch.float64, device=device), "channels_last")
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, device=device)
    with launcher.intercept(tune=False), observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 0, 4)
    assert {launch.kernel for launch in launches} == {"grouped"}
    assert_close(out, reference(x, w, None, 2, 1, 0, 4, 1), "float64", 0)
