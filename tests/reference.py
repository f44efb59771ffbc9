"""The one reference and the one tolerance table every kernel test uses."""
from __future__ import annotations

import contextlib
import math
import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from tritondeconv.kernels import cost, launcher, phase_gemm, weight_grad

# Relative error ‖out − ref‖ / ‖ref‖ allowed per precision, against float64.
TOLERANCES = {
    "float64": 1e-12,
    "float32": 1e-5,  # exact fp32 (allow_tf32 off)
    "tf32": 1e-3,  # fp32 inputs, TF32 products (allow_tf32 on, PyTorch's default for convs)
    "float16": 2e-3,
    "bfloat16": 1e-2,
}
# Largest elementwise error allowed per precision, as a fraction of the reference's
# largest magnitude: a bound that does not grow with the data (it scales with it), and
# that a single wrong element trips where the norm above could average it away.
ELEMENT_TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "tf32": 1e-2, "float16": 4e-3, "bfloat16": 1e-2}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


# Each run draws one salt (or takes TRITONDECONV_TEST_SEED, printed in pytest's header);
# a test's seed is the salt mixed with the test's id: fresh inputs every run, and any
# failure reproduces by running its test alone with the salt of the run that failed.
RUN_SALT = int(os.environ.get("TRITONDECONV_TEST_SEED") or random.randrange(2**31))


def fresh_seed() -> int:
    """Seed the generators for the running test (from its id and the run's salt); the
    seed is reported on failure."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    seed = (zlib.crc32(test_id.encode()) ^ RUN_SALT) % 2**31
    torch.manual_seed(seed)
    return seed


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` ``[N, C, *spatial]`` as contiguous ("nchw"), channels-last (channels
    contiguous: PyTorch's memory formats in 4-D and 5-D, a transposed copy in 3-D), or a
    non-contiguous view ("strided") with the same values."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "channels_last" and t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "channels_last":
        return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()])
    if kind == "strided":
        # Every other channel, an interior window of the leading spatial axes, and every
        # other element of the last one.
        n, c, *spatial = t.shape
        big_shape = [n, 2 * c, *(s + 2 for s in spatial[:-1]), 2 * spatial[-1]]
        big = torch.full(big_shape, float("nan"), dtype=t.dtype, device=t.device)
        view = big[(slice(None), slice(None, None, 2), *(slice(1, -1),) * (len(spatial) - 1), slice(None, None, 2))]
        view.copy_(t)
        assert not view.is_contiguous() or spatial[-1] == 1  # (taking every other of one element is no stride)
        return view
    raise ValueError(kind)


def same_layout(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``out`` is laid out as ``expected`` (PyTorch's own result for the same
    inputs on the same device and dtype): the same strides on every axis longer than 1."""
    return out.shape == expected.shape and all(
        a == b for a, b, n in zip(out.stride(), expected.stride(), out.shape) if n > 1)


def reference(x, w, b, stride, padding, output_padding, groups, dilation):
    """PyTorch's transposed convolution of ``w``'s rank in float64 on the same (already
    rounded) values."""
    fn = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[w.dim()]
    return fn(x.double(), w.double(), None if b is None else b.double(),
              stride, padding, output_padding, groups, dilation)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def computed_as(dtype: torch.dtype, device: torch.device | str) -> str:
    """The precision a convolution of ``dtype`` on ``device`` is judged at, as PyTorch's
    TF32 switch for convolutions stands now (on by default: fp32 on a GPU then
    multiplies in TF32)."""
    name = str(dtype).removeprefix("torch.")
    return judged_as("tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else name, device)


def judged_as(precision: str, device: torch.device | str) -> str:
    """The precision a result on ``device`` is judged at: TF32 only where it can happen.
    The Triton interpreter ignores TF32 (its products are exact fp32), so on the CPU a
    "tf32" result must meet fp32's tolerance."""
    return "float32" if precision == "tf32" and torch.device(device).type == "cpu" else precision


def assert_close(out: torch.Tensor, ref: torch.Tensor, precision: str, seed: int,
                 twin: torch.Tensor | None = None) -> None:
    """Shape, finiteness (outputs are poisoned with NaN first), relative error (norm) and
    the largest elementwise error, at the precision ``out``'s device can have
    (``judged_as``).  The table's tolerances are for one convolution; a result that
    chains several (a model), each rounding in turn, is judged against ``twin``,
    PyTorch's own result of the same computation in the same dtype on the same device:
    within the table's tolerance or twice PyTorch's own error, whichever is larger."""
    precision = judged_as(precision, out.device)
    assert out.shape == ref.shape, f"shape {list(out.shape)} != {list(ref.shape)} (seed {seed})"
    assert torch.isfinite(out).all(), f"non-finite output: a pixel was never written (seed {seed})"
    allowed, element_allowed = TOLERANCES[precision], ELEMENT_TOLERANCES[precision] * ref.abs().max().item()
    if twin is not None:
        allowed = max(allowed, 2 * relative_error(twin, ref))
        element_allowed = max(element_allowed, 2 * (twin.double() - ref).abs().max().item())
    err = relative_error(out, ref)
    assert err <= allowed, f"relative error {err:.3e} > {allowed:.1e} for {precision} (seed {seed})"
    assert not math.isnan(err)
    if out.numel():
        worst = (out.double() - ref).abs().max().item()
        assert worst <= element_allowed, (f"an element is off by {worst:.3e} > {element_allowed:.3e} for {precision} "
                                          f"(seed {seed})")


PATHS = ("tensor-core", "fma")
# The kernel families with a tile, hence a path (not the split sum, the copy).  The
# grouped kernel (groups side by side as the columns) has one path of its own.
GEMMS = ("phase_gemm", "weight_grad", "grouped")
# Each of those families' configuration table, by its two channel counts (the forward's
# reduced and produced channels, the weight gradient's C_in and C_out).
FAMILIES = {"phase_gemm": phase_gemm.configs, "weight_grad": weight_grad.configs}


def path_of(config: dict, problem) -> str:
    """The path a configuration multiplies on."""
    return "tensor-core" if cost.uses_dot(config, problem) else "fma"


def tile_sides(kernel: str, constants: dict) -> tuple[int, int]:
    """A launch's two tile sides that ``tl.dot`` needs 16 wide (the FMA path's when
    either is narrower): columns and reduction for the phase GEMM, the weight
    gradient's two channel sides; the grouped kernel's columns and reduction, as the
    phase GEMM's."""
    sides = ("BLOCK_N", "BLOCK_K") if kernel in ("phase_gemm", "grouped") else ("BLOCK_M", "BLOCK_N")
    return tuple(int(constants[s]) for s in sides)


def skip_without_tma(device: str) -> None:
    """Skip on a GPU without a tensor memory accelerator (compute capability below 9.0);
    the interpreter emulates one."""
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the tensor memory accelerator needs compute capability 9.0")


# The kernel variants a launch may be forced onto: the compile-time constant that selects
# each (the phase GEMMs with pointer loads set none of them).
VARIANTS = phase_gemm.VARIANTS


@contextlib.contextmanager
def on_path(path: str | None = None, variant: str | None = None):
    """Every launch in the block takes a tile of ``path`` (``"tensor-core"`` or ``"fma"``;
    ``None``: the first candidate's) where its candidates offer one (the launcher's seam
    picks it; a layer with 16 channels or more on both sides offers only tensor-core
    tiles), of the kernel variant ``variant`` (one of ``VARIANTS``) where it is offered,
    of the plain phase GEMMs otherwise; always the phase GEMM, where a layer of few
    channels per group could also take the grouped kernel."""
    def choose(request, candidates):
        if len(candidates) == 1:  # nothing to choose (a one-configuration kernel: the split sum, the staging copy)
            return candidates[0]
        problem = request.problem()
        chosen = [c for c in candidates if all(bool(c.get(v)) == (v == variant) for v in VARIANTS)] or candidates
        return next((c for c in chosen if path is None or path_of(c, problem) == path), chosen[0])

    with launcher.intercept(choose=choose, only=(("grouped", False),)):
        yield


def input_copies(launches: list) -> int:
    """How many channels-last copies of a GEMM's input (staging launches) ``launches``
    (from ``observe_launches``) hold."""
    return sum(launch.kernel == "staging" for launch in launches)


def narrow_layer(device):
    """A layer with 3 output channels: two candidates (tensor cores, FMA) in the interpreter
    (channels-last input: its 20 NCHW channels would also race a channels-last copy);
    its input, weight and PyTorch's output."""
    x = layout(torch.randn(2, 20, 5, 5, dtype=torch.float64, device=device), "channels_last")
    w = torch.randn(20, 3, 4, 4, dtype=torch.float64, device=device)
    return x, w, F.conv_transpose2d(x, w, None, 2, 1)


def allocated_during(call, device: str):
    """``call()``'s result and the most bytes it held allocated at once beyond what was
    allocated when it began, with the allocator's rounding allowed for: the CUDA caching
    allocator's peak on a GPU; on a CPU, PyTorch's profiler, which reports every CPU
    allocation and free with the allocator's running total."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base, 2 * 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        result = call()

    def events(nodes):
        for node in nodes:
            yield node
            yield from events(node.children)
    allocations = sorted((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated)
                         for e in events(profile.profiler.kineto_results.experimental_event_tree())
                         if e.tag == torch._C._profiler._EventType.Allocation)
    assert allocations, "the profiler saw no allocation: the measurement is broken"
    base = allocations[0][2] - allocations[0][1]
    return result, max(total for _, _, total in allocations) - base, 0
