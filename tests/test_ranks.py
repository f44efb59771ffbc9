"""conv_transpose1d and conv_transpose3d (and the one-GEMM variant on every rank): the same
kernels and checks as 2-D, tested the
same way (float64 references, per-dtype tolerances, NaN-poisoned outputs)."""
import pytest
import torch
import torch.nn.functional as F
from reference import (
    DTYPES,
    TOLERANCES,
    assert_close,
    fresh_seed,
    layout,
    on_path,
    reference,
    relative_error,
    same_layout,
    skip_without_tma,
)

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.kernels.common import configured, observe_launches

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

FUNCTIONS = {1: tritondeconv.conv_transpose1d, 3: tritondeconv.conv_transpose3d}
TORCH_FUNCTIONS = {1: F.conv_transpose1d, 3: F.conv_transpose3d}
OPS = {1: torch.ops.tritondeconv.conv_transpose1d, 3: torch.ops.tritondeconv.conv_transpose3d}
MODULES = {1: (tritondeconv.nn.ConvTranspose1d, torch.nn.ConvTranspose1d),
           3: (tritondeconv.nn.ConvTranspose3d, torch.nn.ConvTranspose3d)}
SPATIAL = {1: (7,), 3: (2, 3, 4)}

# (kernel, stride, padding, output_padding, dilation) per rank; the vocoder's k16 s8 is 1-D.
GEOMETRIES = {
    "k3s2p1op1": (3, 2, 1, 1, 1),
    "k4s2p1": (4, 2, 1, 0, 1),
    "k2s3op2-phases-without-taps": (2, 3, 0, 2, 1),
    "k3s2p2d2op1": (3, 2, 2, 1, 2),
}
RANK_GEOMETRIES = {1: {**GEOMETRIES, "k16s8p4-vocoder": (16, 8, 4, 0, 1)}, 3: GEOMETRIES}
KINDS = {1: ["nchw", "strided"], 3: ["nchw", "channels_last", "strided"]}


def _cases():
    for rank in (1, 3):
        for kind in KINDS[rank]:
            for name, geometry in RANK_GEOMETRIES[rank].items():
                yield pytest.param(rank, kind, *geometry, id=f"{rank}d-{kind}-{name}")


@pytest.mark.interpreter_subset({"precision": "float64"},
                                reason="interpreter suite: the rank grid runs in float64 on CPU")
@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rank, kind, k, s, p, op, d", list(_cases()))
def test_forward_and_gradients(device, precision, groups, rank, kind, k, s, p, op, d):
    seed = fresh_seed()
    dtype = DTYPES[precision]
    x = layout(torch.randn(2, 4, *SPATIAL[rank], device=device).to(dtype), kind).requires_grad_()
    w = torch.randn(4, 6 // groups, *(k,) * rank, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    args = (s, p, op, groups, d)
    out = FUNCTIONS[rank](x, w, b, *args)
    assert_close(out, reference(x, w, b, *args), precision, seed)
    assert same_layout(out, TORCH_FUNCTIONS[rank](x.detach(), w.detach(), b.detach(), *args))
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(reference(x64, w64, b64, *args), (x64, w64, b64), gy.double())
    for name, a, r in zip(("input", "weight", "bias"), got, ref):
        err = relative_error(a, r)
        assert err <= TOLERANCES[precision], f"grad_{name}: relative error {err:.2e} (seed {seed})"
    xa = x.detach().requires_grad_()
    aten_grad_input, = torch.autograd.grad(TORCH_FUNCTIONS[rank](xa, w.detach(), b.detach(), *args), xa, gy)
    assert same_layout(got[0], aten_grad_input)


@pytest.mark.parametrize(
    "rank, kernel, stride, padding, output_padding, dilation",
    [
        (1, 5, 3, 2, 2, 1),
        (3, (1, 2, 3), (2, 1, 3), (0, 1, 1), (1, 0, 2), (1, 2, 1)),
    ],
    ids=["1d", "3d-anisotropic"],
)
def test_gradcheck_and_gradgradcheck(device, rank, kernel, stride, padding, output_padding, dilation):
    fresh_seed()
    kernel = (kernel,) * rank if isinstance(kernel, int) else kernel
    x = torch.randn(1, 2, *((3,) if rank == 1 else (2, 2, 3)), device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, *kernel, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return FUNCTIONS[rank](x, w, b, stride, padding, output_padding, 1, dilation)

    fast = device == "cpu"  # as in test_backward: the full Jacobian takes minutes in the interpreter
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=fast)


@pytest.mark.parametrize("rank", [1, 3])
def test_unbatched_and_single_ints(device, rank):
    seed = fresh_seed()
    x = torch.randn(3, *SPATIAL[rank], device=device, dtype=torch.float64)
    w = torch.randn(3, 2, *(3,) * rank, device=device, dtype=torch.float64)
    out = OPS[rank](x, w, None, 2, 1, 1)
    assert out.dim() == rank + 1
    assert_close(out, reference(x, w, None, 2, 1, 1, 1, 1), "float64", seed)


@pytest.mark.parametrize("rank", [1, 3])
def test_opcheck(device, rank):
    x = torch.randn(2, 4, *SPATIAL[rank], device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *(2,) * rank, device=device, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS[rank], (x, w, None, [2] * rank, [1] * rank, [1] * rank, 2, [1] * rank))


@pytest.mark.parametrize("rank", [1, 3])
def test_bad_rank(rank):
    with pytest.raises(RuntimeError, match=rf"input to be {rank + 1}-D \(unbatched\) or {rank + 2}-D"):
        FUNCTIONS[rank](torch.randn(1, 2, 3, 3, 3, 3), torch.randn(2, 2, *(3,) * rank))
    with pytest.raises(RuntimeError, match=f"weight to be {rank + 2}-D"):
        FUNCTIONS[rank](torch.randn(1, 2, *SPATIAL[rank]), torch.randn(2, 2, 3, 3))
    with pytest.raises(RuntimeError, match=f"a list of {rank} values"):
        FUNCTIONS[rank](torch.randn(1, 2, *SPATIAL[rank]), torch.randn(2, 2, *(3,) * rank), stride=[1] * (rank + 1))


@pytest.mark.parametrize("rank", [1, 3])
def test_modules_and_convert(device, rank):
    seed = fresh_seed()
    ours_cls, theirs_cls = MODULES[rank]
    config = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2)
    torch.manual_seed(seed)
    ours = ours_cls(**config, device=device, dtype=torch.float64)
    torch.manual_seed(seed)
    theirs = theirs_cls(**config, device=device, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, *SPATIAL[rank], device=device, dtype=torch.float64)
    target = [2 * s for s in SPATIAL[rank]]
    assert relative_error(ours(x, output_size=target), theirs(x, output_size=target)) <= TOLERANCES["float64"]

    model = torch.nn.Sequential(theirs, torch.nn.ReLU(), torch.nn.ConvTranspose2d(2, 2, 1))
    assert tritondeconv.convert(model, return_count=True) == (model, 2)
    assert type(model[0]) is ours_cls and type(model[2]) is tritondeconv.nn.ConvTranspose2d


def test_reference_is_pytorch():
    """The 1-D/3-D reference dispatches on the weight's rank."""
    x, w = torch.randn(1, 2, 5), torch.randn(2, 3, 3)
    assert torch.equal(reference(x, w, None, 2, 1, 1, 1, 1), F.conv_transpose1d(x.double(), w.double(), None, 2, 1, 1))


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("rank", [1, 2])
def test_lower_ranks_launch_as_their_unsqueezed_tensors_would(rank, kind):
    """The kernels run 1-D and 2-D tensors on three spatial axes: the added axes get the
    sizes and strides ``unsqueeze`` gives them, so that Triton specialises a launch (its
    1-valued and 16-divisible integers) exactly as it would the unsqueezed tensor's."""
    from tritondeconv.kernels.common import padded

    t = torch.empty(2, 24, *(5,) * rank)
    if kind == "channels_last":
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    elif kind == "sliced":
        t = t[:, ::2, ..., 1:]
    unsqueezed = t
    while unsqueezed.dim() < 5:
        unsqueezed = unsqueezed.unsqueeze(2)
    assert padded((t.shape, t.stride()), 3 - rank) == (unsqueezed.shape, unsqueezed.stride())


# Layers where every output gathers exactly one (input, tap) pair, which the one-GEMM
# variant computes: (kernel, stride, padding, output_padding, dilation).
ONE_GEMM_GEOMETRIES = {
    "k2s2": (2, 2, 0, 0, 1),
    "k3s3": (3, 3, 0, 0, 1),
    "k2s2p1op1": (2, 2, 1, 1, 1),
    "k4s4p1": (4, 4, 1, 0, 1),
    "k3s3p2d2": (3, 3, 2, 0, 2),
}


def _one_gemm_cases():
    """Every geometry in 2-D in both layouts, with and without groups; in 1-D (NCHW) with
    groups, in 3-D channels-last without (the dtypes: test_kernel_variants)."""
    for name, geometry in ONE_GEMM_GEOMETRIES.items():
        for rank, kind, groups in [(2, "nchw", 1), (2, "nchw", 2), (2, "channels_last", 1), (2, "channels_last", 2),
                                   (1, "nchw", 2), (3, "channels_last", 1)]:
            yield pytest.param(rank, kind, groups, *geometry, id=f"{rank}d-{kind}-g{groups}-{name}")


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("rank, kind, groups, k, s, p, op, d", list(_one_gemm_cases()))
def test_one_gemm_variant(device, precision, rank, kind, groups, k, s, p, op, d):
    """The forward's one-GEMM variant, forced, over the geometries it takes, in every
    rank, both layouts, with groups."""
    seed = fresh_seed()
    dtype = DTYPES[precision]
    function = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
    x = layout(torch.randn(2, 16, *{1: (7,), 2: (3, 4), 3: (2, 3, 2)}[rank], device=device).to(dtype), kind)
    w = torch.randn(16, 16 // groups, *(k,) * rank, device=device).to(dtype)
    b = torch.randn(16, device=device).to(dtype)
    with observe_launches() as launches, on_path(variant="ONE_GEMM"):
        out = function[rank](x, w, b, s, p, op, groups, d)
    assert [launch.constants["ONE_GEMM"] for launch in launches] == [True]
    assert_close(out, reference(x, w, b, s, p, op, groups, d), precision, seed)
    assert same_layout(out, TORCH_FUNCTIONS.get(rank, F.conv_transpose2d)(x, w, b, s, p, op, groups, d))


# Layers of few output channels whose phases go side by side as columns (dilation 1):
# (kernel, stride, padding, output_padding), kernels from shorter than the stride (phases
# without taps) to three times it (FSRCNN's k9 s3 output layer among them).
PHASE_COLUMN_GEOMETRIES = {
    "k4s2p1": (4, 2, 1, 0),
    "k3s2p1op1": (3, 2, 1, 1),
    "k9s3p4op2": (9, 3, 4, 2),
    "k2s3op2-phases-without-taps": (2, 3, 0, 2),
    "k5s2p3": (5, 2, 3, 0),
}


def _phase_column_cases():
    """Every geometry in 2-D in both layouts, with and without groups; in 1-D (NCHW) with
    groups, in 3-D channels-last without."""
    for name, geometry in PHASE_COLUMN_GEOMETRIES.items():
        for rank, kind, groups in [(2, "nchw", 1), (2, "channels_last", 2), (1, "nchw", 2), (3, "channels_last", 1)]:
            yield pytest.param(rank, kind, groups, *geometry, id=f"{rank}d-{kind}-g{groups}-{name}")


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("rank, kind, groups, k, s, p, op", list(_phase_column_cases()))
def test_phase_columns_variant(device, precision, rank, kind, groups, k, s, p, op):
    """The forward with its phases side by side as columns, forced, over the geometries
    it takes (kernels shorter than the stride and up to three times it, padding past a
    stride), every rank, both layouts, with groups; 3 output channels per group."""
    seed = fresh_seed()
    dtype = DTYPES[precision]
    function = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
    x = layout(torch.randn(2, 16, *{1: (7,), 2: (3, 4), 3: (2, 3, 2)}[rank], device=device).to(dtype), kind)
    w = torch.randn(16, 3, *(k,) * rank, device=device).to(dtype)
    b = torch.randn(3 * groups, device=device).to(dtype)
    with observe_launches() as launches, on_path(variant="PHASE_COLUMNS"):
        out = function[rank](x, w, b, s, p, op, groups, 1)
    assert [launch.constants["PHASE_COLUMNS"] for launch in launches] == [True]
    assert_close(out, reference(x, w, b, s, p, op, groups, 1), precision, seed)
    assert same_layout(out, TORCH_FUNCTIONS.get(rank, F.conv_transpose2d)(x, w, b, s, p, op, groups, 1))


@pytest.mark.parametrize("channels, dilation, asked, offered", [
    (16, 1, False, False), (3, 2, False, False), (16, 1, True, True), (3, 2, True, False)],
    ids=["16-output-channels", "dilated", "16-output-channels-experimental", "dilated-experimental"])
def test_phase_columns_offered_for_few_output_channels_undilated(device, channels, dilation, asked, offered):
    """Offered for fewer than 16 output channels per group without dilation; for any
    number of output channels where ``TRITONDECONV_EXPERIMENTAL=phase_columns`` asks for
    it; never with dilation (the phases' taps then read different inputs).  Where it is
    not offered, the launch forced onto it takes the phase GEMMs."""
    x = torch.randn(2, 16, 3, 4, device=device, dtype=torch.float64)
    w = torch.randn(16, channels, 3, 3, device=device, dtype=torch.float64)
    with configured(experimental={"phase_columns"} if asked else set()), observe_launches() as launches, \
            on_path(variant="PHASE_COLUMNS"):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, 1, dilation)
    assert [launch.constants["PHASE_COLUMNS"] for launch in launches] == [offered]
    assert_close(out, reference(x, w, None, 2, 1, 1, 1, dilation), "float64", 0)


def _tma_cases():
    """Every geometry with and without groups in 2-D; in 3-D and 1-D (a channels-contiguous
    view: 1-D tensors have no channels-last format) without."""
    for name, geometry in GEOMETRIES.items():
        for rank, groups in [(2, 1), (2, 2), (3, 1), (1, 1)]:
            yield pytest.param(rank, groups, *geometry, id=f"{rank}d-g{groups}-{name}")


@pytest.mark.parametrize("precision", ["float64"], indirect=True)
@pytest.mark.parametrize("rank, groups, k, s, p, op, d", list(_tma_cases()))
def test_tma_variant(device, precision, rank, groups, k, s, p, op, d):
    """The experimental TMA phase GEMM, forced, over the geometry grid (phases without
    taps, dilation, output padding), every rank, with groups: each tap's input tile is a
    box of the input with zero fill past its borders."""
    skip_without_tma(device)
    seed = fresh_seed()
    function = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
    spatial = {1: (7,), 2: (3, 4), 3: (2, 3, 2)}[rank]
    x = torch.randn(2, *spatial, 16, device=device, dtype=torch.float64).movedim(-1, 1)  # channels contiguous
    w = torch.randn(16, 16 // groups, *(k,) * rank, device=device, dtype=torch.float64)
    b = torch.randn(16, device=device, dtype=torch.float64)
    with configured(experimental={"tma"}), observe_launches() as launches, on_path("tensor-core", variant="TMA_W"):
        out = function[rank](x, w, b, s, p, op, groups, d)
    assert [launch.constants["TMA_W"] > 0 for launch in launches] == [True]
    assert_close(out, reference(x, w, b, s, p, op, groups, d), "float64", seed)


def test_a_tuned_one_gemm_is_not_reused_where_it_does_not_apply(device, monkeypatch, tmp_path):
    """k2 s2 with and without output padding along W share every shape the tuning looks
    at (the rows per phase within the same power of two) but the last output column,
    which with output padding gathers no (input, tap) pair: the first layer's tuning (the
    one GEMM, made to win) must not carry over to the second."""
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path))
    launcher.forget_tunings()
    seed = fresh_seed()
    x = torch.randn(2, 16, 3, 4, device=device, dtype=torch.float64)
    w = torch.randn(16, 16, 2, 2, device=device, dtype=torch.float64)
    times = iter(range(100, 0, -1))  # each candidate timed is faster than the one before
    with launcher.intercept(tune=True, clock=lambda run: (run(), next(times))[1]):
        with observe_launches() as first:
            tritondeconv.conv_transpose2d(x, w, None, 2)
        with observe_launches() as second:
            out = tritondeconv.conv_transpose2d(x, w, None, 2, output_padding=(0, 1))
    launcher.forget_tunings()
    # The GEMM that computed each result: its call's last (NCHW input also races a
    # channels-last copy, and each run of the race computes the result).
    assert [[launch for launch in launches if launch.kernel == "phase_gemm"][-1].constants["ONE_GEMM"]
            for launches in (first, second)] == [True, False]
    assert_close(out, reference(x, w, None, 2, 0, (0, 1), 1, 1), "float64", seed)
