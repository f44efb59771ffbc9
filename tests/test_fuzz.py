"""Differential fuzzing against PyTorch: seeded random cases over the whole argument
space (rank, batch, channels, groups, kernel, stride, padding, output_padding, dilation,
layout, non-contiguous views, bias, dtype), forward and backward, against PyTorch in
float64, each case on one side of the kernel choices a layer can offer (the phases side
by side, the grouped kernel), and wide-channel cases run on both sides of the NCHW
input's channels-last copy (the tensor-core tiles' path).  Case ``i`` is drawn from
seed ``i``, so a failure names its own reproduction: ``pytest tests/test_fuzz.py -k
"cpu-17"``; a case that ever fails is copied into REGRESSIONS below."""
import math
import os
import random

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from reference import TOLERANCES, computed_as, input_copies, layout, reference, relative_error

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.kernels.common import observe_launches

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# Cases per device; TRITONDECONV_FUZZ_CASES sets the CUDA count (the GPU run sets it to
# what fits its time).
CASES = {"cpu": 300, "cuda": int(os.environ.get("TRITONDECONV_FUZZ_CASES", "2000"))}
FUNCTIONS = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Cases that once failed, as (device-independent) seeds; none so far.
REGRESSIONS: list[int] = []


def draw_case(seed: int, device: str) -> dict:
    """A random valid call, small enough for the interpreter on CPU."""
    rng = random.Random(seed)
    rank = rng.choice([1, 2, 2, 2, 3])
    groups = rng.choice([1, 1, 2, 3])
    depthwise = rng.random() < 0.15
    c_in = groups * (1 if depthwise else rng.randint(1, 3 if device == "cpu" else 20))
    c_out_g = 1 if depthwise else rng.randint(1, 3 if device == "cpu" else 20)
    while True:
        kernel = [rng.randint(1, 5) for _ in range(rank)]
        stride = [rng.choice([1, 2, 2, 3, 4]) for _ in range(rank)]
        dilation = [rng.choice([1, 1, 2, 3]) for _ in range(rank)]
        padding = [rng.randint(0, 3) for _ in range(rank)]
        output_padding = [rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation)]
        size = [rng.randint(1, {1: 6, 2: 4, 3: 3}[rank]) for _ in range(rank)]
        out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
               for n, s, p, d, k, op in zip(size, stride, padding, dilation, kernel, output_padding)]
        if min(out) > 0:
            break
    return dict(
        rank=rank, batch=rng.choice([0, 1, 1, 2, 2, 3]), c_in=c_in, c_out_g=c_out_g, groups=groups, kernel=kernel,
        stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, size=size,
        kind=rng.choice(["nchw", "channels_last", "strided"] if rank >= 2 else ["nchw", "strided"]),
        bias=rng.random() < 0.6, precision=rng.choice(list(PRECISIONS)), unbatched=rng.random() < 0.1,
    )


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> bool:
    """Relative error within tolerance; an all-zero reference (every output a phase without
    taps, or only padding reached) must be matched exactly."""
    if want.norm() == 0:
        return bool((got == 0).all())
    return relative_error(got, want) <= tolerance


def draw_wide_case(seed: int, device: str) -> dict:
    """``draw_case``'s call with 16 to 32 channels per group on both sides: the tensor-core
    tiles, and NCHW input that races a channels-last copy of itself (channels in 16-byte
    rows in every dtype)."""
    case = draw_case(seed, device)
    rng = random.Random(-1 - seed)
    case.update(c_in=case["groups"] * rng.choice([16, 24, 32]), c_out_g=rng.choice([16, 24, 32]))
    return case


def run_case(seed: int, device: str, case: dict | None = None) -> None:
    """Case ``seed`` (``draw_case``'s, unless ``case`` is given) against the reference."""
    case = draw_case(seed, device) if case is None else case
    torch.manual_seed(seed)
    dtype = PRECISIONS[case["precision"]]
    tolerance = TOLERANCES[computed_as(dtype, device)]
    x = torch.randn(case["batch"], case["c_in"], *case["size"], device=device).to(dtype)
    x = layout(x, case["kind"]) if case["batch"] else x
    if case["unbatched"] and case["batch"] == 1:
        x = x[0]
    w = torch.randn(case["c_in"], case["c_out_g"], *case["kernel"], device=device).to(dtype)
    b = torch.randn(case["c_out_g"] * case["groups"], device=device).to(dtype) if case["bias"] else None
    args = (case["stride"], case["padding"], case["output_padding"], case["groups"], case["dilation"])
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = FUNCTIONS[case["rank"]](x, w, b, *args)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves[:2], ref_leaves[2] if b is not None else None, *args)
    assert out.shape == ref.shape, case
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), case
    assert _close(out, ref, tolerance), case
    gy = torch.randn_like(out)  # in the op's dtype; the reference gets the same rounded values
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(ref, ref_leaves, gy.double())
    for g, r in zip(got, want):
        assert torch.isfinite(g).all(), case
        assert _close(g, r, tolerance), case


def _params(cases: dict[str, int] = CASES):
    for device, count in cases.items():
        marks = [pytest.mark.skipif(not INTERPRETING,
                                    reason="CPU tensors run the kernels only under TRITON_INTERPRET=1")]
        if device == "cuda":
            marks = [pytest.mark.cuda,
                     pytest.mark.skipif(not HAS_CUDA or INTERPRETING, reason="needs a CUDA GPU, no interpreter")]
        for i in range(count):
            yield pytest.param(device, i, marks=marks, id=f"{device}-{i}")


def _forced(seed: int) -> tuple:
    """The launcher's ``only`` for case ``seed``: odd cases take the phases side by side
    where a layer offers them (few output channels, dilation 1), and one case in three
    the phase GEMM where a channels-last layer of few channels per group would take the
    grouped kernel (its race's default), so that each side of both choices is fuzzed."""
    return ("PHASE_COLUMNS", seed % 2 == 1), ("grouped", seed % 3 != 0)


@pytest.mark.parametrize("device, seed", list(_params()))
def test_fuzz(device, seed):
    with launcher.intercept(only=_forced(seed)):
        run_case(seed, device)


# Wide cases per device, each run on both sides of the NCHW input's race: forced onto the
# input as given and onto its channels-last copy.
WIDE_CASES = {"cpu": 12, "cuda": max(1, CASES["cuda"] // 10)}


@pytest.mark.parametrize("copied", [False, True], ids=["as-given", "copied"])
@pytest.mark.parametrize("device, seed", list(_params(WIDE_CASES)))
def test_fuzz_wide_channels_on_both_sides_of_the_input_copy(device, seed, copied):
    case = draw_wide_case(seed, device)
    with launcher.intercept(only=(("staged", copied),)), observe_launches() as launches:
        run_case(seed, device, case)
    copies = input_copies(launches) > 0
    assert copies <= copied, case  # never a copy where the input as given was asked for
    if copied and case["kind"] == "nchw" and case["batch"] and math.prod(case["size"]) > 1:
        # Contiguous NCHW input of more than one pixel (one pixel is channels-last too),
        # with 16-byte rows of channels: the copy is always on offer.
        assert copies, case


@pytest.mark.parametrize("seed", REGRESSIONS)
def test_regression(device, seed):
    run_case(seed, device)
