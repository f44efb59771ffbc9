"""Every kernel variant once: each compile-time specialisation the API can launch
(direction, tensor-core or FMA tiles, dtype, bias, activation, residual, index width),
checked against PyTorch in float64 and proven to have run through the launch observer.

This file is also the smoke run for a second Triton version (CI runs it with the GPU's
Triton as well as its own), so it stays small: one geometry per variant.  The
interpreter's ``tl.dot`` is a NumPy matmul: it proves the indexing and masking of the
tensor-core path, not MMA numerics or pipelining.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from reference import (
    DTYPES,
    GEMMS,
    assert_close,
    fresh_seed,
    input_copies,
    layout,
    on_path,
    reference,
    skip_without_tma,
    tile_sides,
)

import tritondeconv
from tritondeconv.kernels import launcher, phase_gemm
from tritondeconv.kernels.activations import ACTIVATIONS
from tritondeconv.kernels.common import INTERPRETING, configured, force_int64_index, observe_launches

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# Channels per side that select each path: tl.dot needs tiles of at least 16 a side.
PATH_CHANNELS = {"tensor-core": 16, "fma": 4}
TORCH_ACTIVATIONS = {"relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, 0.2), "silu": F.silu,
                     "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _path(launch) -> str:
    """The path a launch took, from its tile."""
    return "tensor-core" if min(tile_sides(launch.kernel, launch.constants)) >= 16 else "fma"


def _variants(launches) -> set:
    """The GEMM launches' (family, direction, path); the split sum that adds the weight
    and bias gradients' partials has no tile, hence no path."""
    assert {launch.kernel for launch in launches} <= {*GEMMS, "split_sum"}
    return {(launch.kernel, launch.constants.get("TRANSPOSED"), _path(launch))
            for launch in launches if launch.kernel in GEMMS}


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("path", list(PATH_CHANNELS))
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_forward_and_both_gradients(device, precision, path, int64, kind):
    """The forward (transposed), the input gradient (direct) and the weight gradient, on
    the path the channels select, in every dtype, both index widths and both layouts."""
    seed = fresh_seed()
    dtype, c = DTYPES[precision], PATH_CHANNELS[path]
    x = layout(torch.randn(2, c, 3, 4, device=device).to(dtype), kind).requires_grad_()
    w = torch.randn(c, c, 3, 3, device=device).to(dtype).requires_grad_()
    b = torch.randn(c, device=device).to(dtype).requires_grad_()
    with observe_launches() as launches, on_path(path), force_int64_index() if int64 else contextlib.nullcontext():
        out = tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1)
        gy = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w, b), gy)
    assert _variants(launches) == {("phase_gemm", True, path), ("phase_gemm", False, path), ("weight_grad", None, path)}
    assert {launch.constants["INT64_INDEX"] for launch in launches if launch.kernel in GEMMS} == {int64}
    assert {launch.constants["HAS_BIAS"] for launch in launches if launch.kernel == "phase_gemm"} == {True, False}
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference(x64, w64, b64, 2, 1, 1, 1, 1)
    assert_close(out, ref.detach(), precision, seed)
    for ours, theirs in zip(got, torch.autograd.grad(ref, (x64, w64, b64), gy.double())):
        assert_close(ours, theirs, precision, seed)


@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("precision", ["float32"], indirect=True)
def test_every_epilogue(device, precision, activation, residual):
    """Each activation, with and without the residual, in the tensor-core tile's epilogue
    (fp32 with TF32 off, as the tolerance assumes)."""
    seed = fresh_seed()
    x = torch.randn(2, 16, 3, 3, device=device, dtype=torch.float32)
    w = torch.randn(16, 16, 2, 2, device=device, dtype=torch.float32)
    b = torch.randn(16, device=device, dtype=torch.float32)
    ref = reference(x, w, b, 2, 0, 0, 1, 1)
    r = torch.randn(ref.shape, device=device) if residual else None
    with observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, b, 2, activation=activation, negative_slope=0.2, residual=r)
    (launch,) = launches
    assert (launch.constants["ACTIVATION"], launch.constants["HAS_RESIDUAL"], _path(launch)) == (
        activation, residual, "tensor-core")
    expected = TORCH_ACTIVATIONS[activation](ref) + (0 if r is None else r.double())
    assert_close(out, expected, "float32", seed)


# Per kernel variant of the forward, the constant that selects it and a layer that
# offers it (kernel size, stride, padding, output padding, output channels: None, as
# many as input channels): the phase GEMMs, the one GEMM of a layer with kernel size =
# stride, and the phases side by side of a layer of few output channels (4: its 4 phases
# make 16 columns, a tensor-core tile where the input has 16 channels).
FORWARD_VARIANTS = {"phases": (None, 3, 2, 1, 1, None), "one-gemm": ("ONE_GEMM", 2, 2, 0, 0, None),
                    "phase-columns": ("PHASE_COLUMNS", 3, 2, 1, 1, 4)}


@pytest.mark.parametrize("variant", list(FORWARD_VARIANTS))
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("path", list(PATH_CHANNELS))
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_epilogue_on_every_variant_path_dtype_and_index_width(device, precision, path, int64, variant):
    """An activation and a residual fused into the store, on each forward variant (the
    one GEMM: rows are input pixels, columns (tap, channel) pairs, stored as a pixel
    shuffle) and path, in every dtype, with 32- and 64-bit indexing (gelu: the
    epilogue's longest expression)."""
    seed = fresh_seed()
    constant, k, s, p, op, c_out = FORWARD_VARIANTS[variant]
    dtype, c = DTYPES[precision], PATH_CHANNELS[path]
    c_out = c_out or c
    x = torch.randn(2, c, 3, 4, device=device).to(dtype)
    w = torch.randn(c, c_out, k, k, device=device).to(dtype)
    b = torch.randn(c_out, device=device).to(dtype)
    ref = reference(x, w, b, s, p, op, 1, 1)
    r = torch.randn(ref.shape, device=device).to(dtype)
    with observe_launches() as launches, on_path(path, variant=constant), \
            force_int64_index() if int64 else contextlib.nullcontext():
        out = tritondeconv.conv_transpose2d(x, w, b, s, p, op, activation="gelu", residual=r)
    (launch,) = launches
    assert (launch.constants["ACTIVATION"], launch.constants["HAS_RESIDUAL"], _path(launch),
            launch.constants["INT64_INDEX"], launch.constants["ONE_GEMM"], launch.constants["PHASE_COLUMNS"]) == (
        "gelu", True, path, int64, constant == "ONE_GEMM", constant == "PHASE_COLUMNS")
    assert_close(out, TORCH_ACTIVATIONS["gelu"](ref) + r.double(), precision, seed)


# Output channels that put one tap in every column tile of the weight gradient (as many
# as its widest tile: 16 in the interpreter, 128 on a GPU) or several (4 a tap).
TAPS_PER_TILE = {"one": 16 if INTERPRETING else 128, "several": 4}


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("taps", list(TAPS_PER_TILE))
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("path", list(PATH_CHANNELS))
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_weight_gradient_with_one_or_several_taps_per_tile(device, precision, path, int64, taps, kind):
    """The weight gradient's columns are (tap, output channel) pairs: a tile holding one
    tap (its bounds check per row) and one holding several (per element), on each path,
    in every dtype and both index widths and layouts."""
    seed = fresh_seed()
    dtype, c_in, c_out = DTYPES[precision], PATH_CHANNELS[path], TAPS_PER_TILE[taps]
    x = layout(torch.randn(2, c_in, 3, 4, device=device).to(dtype), kind)
    gy = layout(torch.randn(2, c_out, 6, 8, device=device).to(dtype), kind)
    with observe_launches() as launches, on_path(path), force_int64_index() if int64 else contextlib.nullcontext():
        got = torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [3, 3], [2, 2], [1, 1], [1, 1], 1)
    (launch,) = [launch for launch in launches if launch.kernel == "weight_grad"]
    assert (_path(launch), launch.constants["INT64_INDEX"], launch.constants["TAPS_N"] > 1) == (
        path, int64, taps == "several")
    w64 = torch.zeros(c_in, c_out, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    F.conv_transpose2d(x.double(), w64, None, 2, 1, 1).backward(gy.double())
    assert_close(got, w64.grad, precision, seed)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_folded_upsample_conv_on_tensor_cores(device, kind):
    """The folded nearest-upsample + convolution, on the tensor-core tiles, forward and
    backward, against the unfused pair."""
    seed = fresh_seed()
    x = layout(torch.randn(2, 16, 3, 3, device=device, dtype=torch.float64), kind).requires_grad_()
    w = torch.randn(16, 16, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    with observe_launches() as launches:
        out = tritondeconv.upsample_conv2d(x, w, None, 2, 1)
        gy = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w), gy)
    assert {_path(launch) for launch in launches} == {"tensor-core"} and len(launches) == 3
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, None, padding=1)
    assert_close(out, ref.detach(), "float64", seed)
    for ours, theirs in zip(got, torch.autograd.grad(ref, (x, w), gy)):
        assert_close(ours, theirs, "float64", seed)


# Layers whose NCHW input the phase GEMM may read from a channels-last copy (16 or more
# channels per group reduced over, in both directions): spatial size, weight shape,
# (stride, padding, output padding, groups, dilation), and how the input is laid out.
STAGED = {
    "2-D": ((3, 4), (16, 16, 3, 3), (2, 1, 1, 1, 1), "nchw"),
    "2-D groups 2, dilation 2": ((3, 3), (32, 16, 3, 3), (2, 0, 1, 2, 2), "nchw"),
    "2-D k2 s2": ((3, 4), (16, 16, 2, 2), (2, 0, 0, 1, 1), "nchw"),
    "2-D channel slice": ((3, 4), (16, 16, 3, 3), (2, 1, 1, 1, 1), "channel slice"),
    "1-D": ((5,), (16, 16, 4), (2, 1, 0, 1, 1), "nchw"),
    "3-D": ((2, 3, 2), (16, 16, 3, 3, 3), (2, 1, 1, 1, 1), "nchw"),
}


def _staged_input(spatial, channels, kind, dtype, device) -> torch.Tensor:
    """An NCHW input, or 16 channels out of a wider NCHW tensor (batch and channel
    strides that are not the tensor's own extent)."""
    if kind == "channel slice":
        return torch.randn(2, channels + 8, *spatial, device=device).to(dtype)[:, 3:3 + channels]
    return torch.randn(2, channels, *spatial, device=device).to(dtype)


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("case", list(STAGED))
@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_forward_and_both_gradients_on_channels_last_copies(device, precision, case, int64):
    """NCHW operands read from channels-last copies (the races' other run, forced through
    the seam): the forward and the input gradient each copy their GEMM's input (the
    input, grad_output), the weight gradient both of its operands (the input and
    grad_output), and all compute the right values, on every dtype, index width and
    geometry (groups, dilation, output padding, 1-3 spatial axes, a strided channel
    slice)."""
    if int64 and case != "2-D":
        pytest.skip("64-bit indexing: one geometry is enough (the copy's indices are the same for all)")
    seed = fresh_seed()
    spatial, w_shape, (s, p, op, g, d), kind = STAGED[case]
    dtype = DTYPES[precision]
    x = _staged_input(spatial, w_shape[0], kind, dtype, device).requires_grad_()
    w = torch.randn(w_shape, device=device).to(dtype).requires_grad_()
    function = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d,
                3: tritondeconv.conv_transpose3d}[len(spatial)]
    with observe_launches() as launches, launcher.intercept(only=(("staged", True),)), \
            force_int64_index() if int64 else contextlib.nullcontext():
        out = function(x, w, None, s, p, op, g, d)
        gy = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w), gy)
    kinds = [launch.kernel for launch in launches]
    assert kinds.count("staging") == 4 and kinds.count("phase_gemm") == 2 and kinds.count("weight_grad") == 1
    assert {launch.constants["INT64_INDEX"] for launch in launches if launch.kernel in GEMMS} == {int64}
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = reference(x64, w64, None, s, p, op, g, d)
    assert_close(out, ref.detach(), precision, seed)
    for ours, theirs in zip(got, torch.autograd.grad(ref, (x64, w64), gy.double())):
        assert_close(ours, theirs, precision, seed)


def test_channels_last_copy_offered_only_where_it_can_pay(device):
    """The race (and so the copy) is offered on strided channels only, 16 or more of them
    per group, in 16-byte rows, with spatial axes the copy can read as one; elsewhere
    the phase GEMM reads the input as given even when the copy is asked for."""
    def copies(x, w, groups=1) -> bool:
        with observe_launches() as launches, launcher.intercept(only=(("staged", True),)):
            out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 0, groups)
        assert_close(out, reference(x, w, None, 2, 1, 0, groups, 1), "float64", 0)
        return input_copies(launches) > 0

    x = torch.randn(2, 16, 3, 4, device=device, dtype=torch.float64)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=torch.float64)
    assert copies(x, w)
    assert not copies(layout(x, "channels_last"), w)  # channels contiguous already
    assert not copies(x, torch.randn(16, 8, 3, 3, device=device, dtype=torch.float64), 2)  # 8 per group
    wide = torch.randn(2, 16, 3, 8, device=device, dtype=torch.float64)
    assert not copies(wide[..., ::2], w)  # pixels strided along W: not one axis of unit stride
    assert not copies(torch.randn(2, 17, 3, 4, device=device, dtype=torch.float64),
                      torch.randn(17, 16, 3, 3, device=device, dtype=torch.float64))  # 136-byte rows


def test_weight_gradient_copies_its_strided_operands_where_each_can_pay(device):
    """The weight gradient's race (and so its copies) is offered where every operand with
    strided channels can be copied (``test_channels_last_copy_offered_only_where_it_can_pay``'s
    rule, per operand): then it copies exactly those; where one cannot be, it reads both
    as given even when the copies are asked for."""
    def copies(x, gy, groups=1) -> int:
        w = torch.randn(x.shape[1], gy.shape[1] // groups, 4, 4, device=device, dtype=torch.float64)
        with observe_launches() as launches, launcher.intercept(only=(("staged", True),)):
            got = torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], groups)
        ref = torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [1, 1], [1, 1], True, [0, 0], groups,
                                                  [False, True, False])[1]
        assert_close(got, ref, "float64", 0)
        return input_copies(launches)

    def nchw(n, c, h, w):
        return torch.randn(n, c, h, w, device=device, dtype=torch.float64)

    x, gy = nchw(2, 16, 3, 4), nchw(2, 16, 6, 8)
    assert copies(x, gy) == 2
    assert copies(layout(x, "channels_last"), gy) == 1  # grad_output only
    assert copies(x, layout(gy, "channels_last")) == 1  # the input only
    assert copies(layout(x, "channels_last"), layout(gy, "channels_last")) == 0
    assert copies(nchw(2, 16, 3, 4), nchw(2, 16, 6, 8), 2) == 0  # 8 channels per group on both sides
    assert copies(x, nchw(2, 17, 6, 8)) == 0  # grad_output's 136-byte rows: no copy, so neither is copied
    assert copies(nchw(2, 16, 3, 8)[..., ::2], gy) == 0  # the input's pixels strided along W


@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"], indirect=True)
def test_tma_forward(device, precision):
    """The experimental TMA phase GEMM (``TRITONDECONV_EXPERIMENTAL=tma``) on
    channels-last input, with an activation and a residual, in every dtype."""
    skip_without_tma(device)
    seed = fresh_seed()
    dtype = DTYPES[precision]
    x = layout(torch.randn(2, 16, 3, 4, device=device).to(dtype), "channels_last")
    w = torch.randn(16, 16, 3, 3, device=device).to(dtype)
    b = torch.randn(16, device=device).to(dtype)
    ref = reference(x, w, b, 2, 1, 1, 1, 1)
    r = torch.randn(ref.shape, device=device).to(dtype)
    with configured(experimental={"tma"}), observe_launches() as launches, on_path("tensor-core", variant="TMA_W"):
        out = tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1, activation="gelu", residual=r)
    (launch,) = launches
    assert launch.constants["TMA_W"] > 0 and _path(launch) == "tensor-core"
    assert_close(out, TORCH_ACTIVATIONS["gelu"](ref) + r.double(), precision, seed)


def _offers_tma(call) -> bool:
    """Whether the transposed convolution's launch in ``call()`` offered a TMA candidate."""
    offered = []

    def choose(request, candidates):
        if request.constants["TRANSPOSED"]:
            offered.append(any(c.get("TMA_W") for c in candidates))
        return candidates[0]

    with launcher.intercept(choose=choose):
        call()
    assert len(offered) == 1
    return offered[0]


def test_tma_offered_only_where_it_can_run(device):
    """The TMA variant is a candidate only when asked for, and only where the hardware's
    limits hold: channels contiguous, 16-byte aligned base and strides (each group's
    first channel too), 32-bit coordinates."""
    skip_without_tma(device)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=torch.bfloat16)
    x = layout(torch.randn(2, 16, 3, 4, device=device, dtype=torch.bfloat16), "channels_last")

    def conv(x, w=w, groups=1):
        return lambda: tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, groups)

    assert not _offers_tma(conv(x))  # not asked for
    with configured(experimental={"tma"}):
        assert _offers_tma(conv(x))
        assert not _offers_tma(conv(x.contiguous()))  # NCHW: channels strided
        with force_int64_index():
            assert not _offers_tma(conv(x))
        wide = layout(torch.randn(2, 17, 3, 4, device=device, dtype=torch.bfloat16), "channels_last")
        assert not _offers_tma(conv(wide[:, 1:]))  # base 2 bytes past alignment, strides of 17 channels
        groups_of_4 = layout(torch.randn(2, 8, 3, 4, device=device, dtype=torch.bfloat16), "channels_last")
        assert not _offers_tma(conv(groups_of_4, torch.randn(8, 8, 3, 3, device=device, dtype=torch.bfloat16), 2))


@pytest.mark.only_on("cuda", reason="the interpreter compiles nothing to launch straight: a GPU's path")
@pytest.mark.parametrize("variant", list(FORWARD_VARIANTS))
@pytest.mark.parametrize("path", list(PATH_CHANNELS))
def test_repeated_calls_take_the_lean_launch(device, path, variant):
    """The first call of each phase GEMM (the forward with an epilogue, its recomputation
    in the backward, the input gradient) goes through Triton's JIT; a second call of the
    same classes launches the compiled kernels straight (the JIT runs no more) and
    computes the right values."""
    constant, k, s, p, op = FORWARD_VARIANTS[variant]
    c = PATH_CHANNELS[path]
    jit_runs = []

    def counted(*args, **kwargs):
        jit_runs.append(1)

    phase_gemm._phase_gemm_kernel.add_pre_run_hook(counted)
    try:
        with on_path(path, variant=constant):
            for repeat in range(2):
                before = len(jit_runs)
                seed = fresh_seed()
                x = torch.randn(2, c, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
                w = torch.randn(c, c, k, k, device=device, dtype=torch.float64, requires_grad=True)
                r = torch.randn_like(reference(x, w, None, s, p, op, 1, 1))
                out = tritondeconv.conv_transpose2d(x, w, None, s, p, op, activation="gelu", residual=r)
                gy = torch.randn_like(out)
                got = torch.autograd.grad(out, (x, w), gy)
                x64, w64 = (t.detach().requires_grad_() for t in (x, w))
                ref = TORCH_ACTIVATIONS["gelu"](reference(x64, w64, None, s, p, op, 1, 1)) + r
                assert_close(out, ref.detach(), "float64", seed)
                for ours, theirs in zip(got, torch.autograd.grad(ref, (x64, w64), gy)):
                    assert_close(ours, theirs, "float64", seed)
                assert (len(jit_runs) > before) == (repeat == 0)
    finally:
        phase_gemm._phase_gemm_kernel.pre_run_hooks.remove(counted)
