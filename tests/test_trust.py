"""Trust: 64-bit indexing for large tensors, NaN/Inf propagation like PyTorch's, threads,
CUDA graphs, memory bounds, a packed-weight cache that is never stale; and the suite's own
checks catch a faulty kernel."""
import contextlib
import dataclasses
import gc
import pickle
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import require_launches
from reference import (
    DTYPES,
    TOLERANCES,
    allocated_during,
    assert_close,
    fresh_seed,
    input_copies,
    layout,
    reference,
    relative_error,
)

import tritondeconv
import tritondeconv.kernels.phase_gemm
import tritondeconv.kernels.weight_grad
from tritondeconv.kernels import launcher
from tritondeconv.kernels.common import force_int64_index, observe_launches, simulate_capture, spans_int64
from tritondeconv.weights import PACKED

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_int64_indexing_is_chosen_per_launch():
    def spans(t):
        return spans_int64(t.shape, t.stride())

    small = torch.empty(2, 3, 4, 5, device="meta")
    big = torch.empty(1, 2, 2**15, 2**15 + 1, device="meta")  # 2**31 + 2**16 elements
    assert not spans(small) and spans(big)
    assert spans(torch.empty(1, device="meta").as_strided((2,), (2**31,)))  # a view with a huge stride
    assert not spans(torch.empty(0, 2**20, 2**20, device="meta"))


@pytest.fixture
def int64_index():
    with force_int64_index():
        yield


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("k, s, p, op, g", [(3, 2, 1, 1, 1), (4, 2, 1, 0, 2), (2, 3, 0, 2, 1)])
@pytest.mark.usefixtures("int64_index")
def test_the_int64_path_computes_the_same(device, kind, k, s, p, op, g):
    """The 64-bit index path (taken for tensors past 2**31 elements) forced on small ones."""
    seed = fresh_seed()
    x = layout(torch.randn(2, 4, 3, 5, device=device, dtype=torch.float64), kind).requires_grad_()
    w = torch.randn(4, 6 // g, k, k, device=device, dtype=torch.float64, requires_grad=True)
    out = tritondeconv.conv_transpose2d(x, w, None, s, p, op, g)
    ref = reference(x, w, None, s, p, op, g, 1)
    assert relative_error(out, ref) <= TOLERANCES["float64"], f"seed {seed}"
    gy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w), gy), torch.autograd.grad(ref, (x, w), gy)):
        assert relative_error(a, r) <= TOLERANCES["float64"], f"seed {seed}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_and_inf_propagate_like_pytorch(device, value, where):
    fresh_seed()
    x = torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64)
    (x[1, 2, 1, 3] if where == "input" else w[1, 0, 2, 1]).fill_(value)
    out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1)
    ref = F.conv_transpose2d(x, w, None, 2, 1, 1)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isposinf(), ref.isposinf())
    assert torch.equal(out.isneginf(), ref.isneginf())
    finite = ref.isfinite()
    assert finite.any() and relative_error(out[finite], ref[finite]) <= TOLERANCES["float64"]


def test_threads_get_correct_results(device):
    """Threads calling the op at once, each on its own shapes (each a first call that
    tunes on a GPU), all correct: 8 threads on CUDA, 4 smaller ones in the interpreter."""
    results, errors = {}, []
    threads_n, repeat = (8, 5) if device == "cuda" else (4, 2)

    def work(i):
        try:
            x = torch.randn(2, 3 + i, 4 + i, 5, device=device, dtype=torch.float64)
            w = torch.randn(3 + i, 4, 3, 3, device=device, dtype=torch.float64)
            for _ in range(repeat):
                out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1)
            results[i] = relative_error(out, F.conv_transpose2d(x, w, None, 2, 1, 1))
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(results[i] <= TOLERANCES["float64"] for i in range(threads_n)), results


@pytest.fixture
def weight_copies():
    """How many copies have been made to pack weights since the test began
    (``tritondeconv.weights.PACKED.copies``)."""
    start = PACKED.copies
    return lambda: PACKED.copies - start


@pytest.mark.parametrize("api", ["module", "functional"])
def test_packed_weight_is_kept_for_inference_and_never_stale(device, weight_copies, api):
    seed = fresh_seed()
    layer = tritondeconv.nn.ConvTranspose2d(6, 4, 3, 2, 1, 1).to(device, torch.float64)
    x = torch.randn(2, 6, 4, 5, device=device, dtype=torch.float64)

    def forward(x):
        if api == "module":
            return layer(x)
        return tritondeconv.conv_transpose2d(x, layer.weight, layer.bias, 2, 1, 1)

    @torch.no_grad()
    def check():
        ref = reference(x, layer.weight, layer.bias, 2, 1, 1, 1, 1)
        assert relative_error(forward(x), ref) <= TOLERANCES["float64"], f"seed {seed}"

    check()
    check()
    assert weight_copies() == 1  # inference: packed once
    with torch.no_grad():
        layer.weight.mul_(-2)  # an in-place update bumps the version counter
    check()
    assert weight_copies() == 2
    # Training: the forward finds the current copy, the backward's input gradient reads
    # that same copy (no packing of its own), and nothing is kept of a weight being trained.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    forward(x.detach().requires_grad_()).square().sum().backward()
    assert weight_copies() == 2 and tritondeconv.clear_weight_cache(torch.nn.Sequential(layer)) == 0
    optimizer.step()
    check()
    assert weight_copies() == 3
    layer.weight.data.add_(1)  # invisible to the version counter: the documented escape hatch
    assert tritondeconv.clear_weight_cache(torch.nn.Sequential(layer)) == 1
    check()
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # a new tensor
    check()
    with torch.inference_mode():
        check()
        layer.weight.mul_(3)
        check()
    assert weight_copies() == 6


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_weights_rebuilt_every_call_are_never_stale_and_not_kept(device, weight_copies):
    """Old-style weight_norm rebuilds the weight at every forward: each call packs the new
    tensor, and its copy goes when the tensor does."""
    seed = fresh_seed()
    layer = torch.nn.utils.weight_norm(tritondeconv.nn.ConvTranspose2d(6, 4, 3, 2, 1).to(device, torch.float64))
    x = torch.randn(2, 6, 4, 5, device=device, dtype=torch.float64)
    gc.collect()
    kept = len(PACKED)
    with torch.no_grad():
        for scale in (1.0, -2.0):
            layer.weight_g.mul_(scale)
            assert relative_error(layer(x), reference(x, layer.weight, layer.bias, 2, 1, 0, 1, 1)) \
                <= TOLERANCES["float64"], f"seed {seed}"
    assert weight_copies() == 2
    del layer.weight
    gc.collect()
    assert len(PACKED) == kept  # the rebuilt weights died, and their copies with them


def test_compiled_calls_reuse_the_packed_weight(device, weight_copies):
    """Under torch.compile the op stays opaque and packs through the same cache: repeated
    compiled calls pack the weight once, and again only after it changes."""
    seed = fresh_seed()
    layer = tritondeconv.nn.ConvTranspose2d(16, 16, 3, 2, 1).to(device)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 16, 4, 5, device=device)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
        assert weight_copies() == 1
        assert_close(out, reference(x, layer.weight, layer.bias, 2, 1, 0, 1, 1), "tf32", seed)
        layer.weight.mul_(-1)
        assert_close(compiled(x), reference(x, layer.weight, layer.bias, 2, 1, 0, 1, 1), "tf32", seed)
    assert weight_copies() == 2


def test_modules_pack_per_call_during_capture(device, weight_copies):
    """During CUDA-graph capture no packed copy is kept: the graph records the packing,
    so a replay after an in-place update reads the new weight (on a CPU the same branch
    runs under ``simulate_capture``)."""
    seed = fresh_seed()
    layer = tritondeconv.nn.ConvTranspose2d(16, 16, 3, 2, 1, 1).to(device, torch.float32)
    x = torch.randn(2, 16, 4, 5, device=device)
    with torch.no_grad():
        with simulate_capture():
            out = layer(x)
            layer(x)
        assert weight_copies() == 2
        assert_close(out, reference(x, layer.weight, layer.bias, 2, 1, 1, 1, 1), "tf32", seed)
        layer(x)
        layer(x)
    assert weight_copies() == 3  # outside the capture the copy is kept


def test_module_with_packed_weight_pickles(device):
    layer = tritondeconv.nn.ConvTranspose2d(3, 2, 3, 2).to(device, torch.float64)
    x = torch.randn(1, 3, 4, 4, device=device, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        copy = pickle.loads(pickle.dumps(layer))
        assert torch.equal(copy(x), out)


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("nchw", [True, False], ids=["nchw", "channels_last"])
def test_a_first_call_leaves_nothing_of_its_tensors_behind(device, nchw, api):
    """What a class's first calls keep for the later ones (prepared calls, prepared
    launches, tunings) holds none of their tensors: once dropped, the input, weight,
    output and gradients of a training step are freed, with the autograd graph behind
    them (a graph kept alive would pin the gradient accumulators to the stream of that
    first step, and a CUDA-graph pool would find tensors it does not track)."""
    size = (5, 6) if api == "functional" else (6, 5)  # (each its own class of calls: a first call)
    x = torch.randn(2, 4, *size, device=device, requires_grad=True)
    if not nchw:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    module = tritondeconv.nn.ConvTranspose2d(4, 3, 3, 2, 1, device=device)
    w, b = ((module.weight, module.bias) if api == "module"
            else (torch.randn(4, 3, 3, 3, device=device).requires_grad_(),
                  torch.randn(3, device=device).requires_grad_()))
    out = module(x) if api == "module" else tritondeconv.conv_transpose2d(x, w, b, 2, 1)
    grads = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    left = [weakref.ref(t) for t in (x, w, b, out, *grads)]
    del x, w, b, out, grads, module
    gc.collect()
    assert [ref() is None for ref in left] == [True] * len(left)


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_cuda)])
def test_cuda_graph_capture_and_replay(_):
    x = torch.randn(4, 32, 8, 8, device="cuda", dtype=torch.float16)
    w = torch.randn(32, 16, 4, 4, device="cuda", dtype=torch.float16)
    b = torch.randn(16, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile and tune outside the capture
        for _ in range(3):
            tritondeconv.conv_transpose2d(x, w, b, 2, 1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tritondeconv.conv_transpose2d(x, w, b, 2, 1)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        w.mul_(-0.5)  # the packed weight is never stale inside a graph either
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, tritondeconv.conv_transpose2d(x, w, b, 2, 1))


def _sizes(device):
    """A layer the size of a real one on a GPU; on a CPU one the interpreter runs quickly,
    still with >= 16 channels (the tensor-core tiles)."""
    return dict(n=8, c_in=256, c_out=128, size=32) if device == "cuda" else dict(n=2, c_in=16, c_out=16, size=8)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# The NCHW input (or grad_output) of these layers is raced against a channels-last copy
# of it: each test forces either way, so that what a tuned run may choose is proven.
INPUT_COPY = pytest.mark.parametrize("input_copy", [False, True], ids=["as given", "copied"])


@INPUT_COPY
def test_forward_allocates_only_output_and_packed_weight(device, input_copy):
    n, c_in, c_out, size = _sizes(device).values()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(n, c_in, size, size, device=device, dtype=dtype)
    w = torch.randn(c_in, c_out, 4, 4, device=device, dtype=dtype)
    with launcher.intercept(only=(("staged", input_copy),)):
        tritondeconv.conv_transpose2d(x, w, None, 2, 1)  # compile and tune first
        with observe_launches() as launches:
            out, extra, rounding = allocated_during(lambda: tritondeconv.conv_transpose2d(x, w, None, 2, 1), device)
    copies = input_copies(launches)
    assert copies == input_copy
    allowed = _nbytes(out, w) + copies * _nbytes(x) + rounding
    assert extra <= allowed, f"forward allocated {extra} bytes; output + packed weight (+ input copy) = {allowed}"


@INPUT_COPY
def test_backward_allocates_only_gradients_and_split_workspace(device, input_copy):
    n, c_in, c_out, size = _sizes(device).values()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(n, c_in, size, size, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(c_in, c_out, 4, 4, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(c_out, device=device, dtype=dtype, requires_grad=True)
    out = tritondeconv.conv_transpose2d(x, w, b, 2, 1)
    gy = torch.randn_like(out)
    with launcher.intercept(only=(("staged", input_copy),)):
        torch.autograd.grad(out, (x, w, b), gy, retain_graph=True)  # compile and tune first
        with observe_launches() as launches:
            grads, extra, rounding = allocated_during(lambda: torch.autograd.grad(out, (x, w, b), gy), device)
    split = tritondeconv.kernels.weight_grad.default_split(n * size * size, -(-c_in // 64) * -(-16 * c_out // 64))
    # Copied: grad_output for the input gradient, then the input and grad_output for the
    # weight gradient.
    assert input_copies(launches) == (3 if input_copy else 0)
    # The gradients, the input gradient's packed copy of the weight, the weight
    # gradient's fp32 partial sums when its reduction is split (with one range it writes
    # the gradient directly), the channels-last copies live at once (the weight
    # gradient's two; in the interpreter, whose arrays keep a launch's arguments until
    # a later launch frees them, the input gradient's copy of grad_output too), and the
    # allocator's rounding.
    copies = _nbytes(x, gy) + (_nbytes(gy) if device == "cpu" else 0)
    allowed = _nbytes(*grads, w) + (w.numel() * 4 * split if split > 1 else 0) + input_copy * copies + rounding
    assert extra <= allowed, f"backward allocated {extra} bytes; gradients + workspace (+ copy) = {allowed}"


def _check_output_slices(x, w, out, slices, precision: str) -> None:
    """k2 s2 (no overlap): every output block depends on one input block, so slices of the
    output can be checked against PyTorch on the matching slices of the input."""
    for n, rows, cols in slices:
        xs = x[n:n + 1, :, rows, cols]
        ref = F.conv_transpose2d(xs.double(), w.double(), None, 2)
        o_rows = slice(None if rows.start is None else 2 * rows.start, None if rows.stop is None else 2 * rows.stop)
        o_cols = slice(None if cols.start is None else 2 * cols.start, None if cols.stop is None else 2 * cols.stop)
        assert relative_error(out[n:n + 1, :, o_rows, o_cols], ref) <= TOLERANCES[precision]


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_cuda)])
def test_bf16_output_above_2_to_the_31_elements(_):
    x = torch.randn(2, 8, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 32, 2, 2, device="cuda", dtype=torch.bfloat16)
    out = tritondeconv.conv_transpose2d(x, w, None, 2)
    assert out.numel() > 2**31
    _check_output_slices(x, w, out, [(0, slice(0, 256), slice(0, 256)), (1, slice(-256, None), slice(-256, None)),
                                     (1, slice(1024, 1280), slice(2048, 2304))], "bfloat16")


def test_the_large_output_checks_logic_at_small_size_with_64_bit_indexing(device):
    """The GPU-only test above, at a size the interpreter runs: the same slices' logic,
    the same 64-bit index arithmetic (forced)."""
    x = torch.randn(2, 8, 32, 32, device=device, dtype=torch.bfloat16)
    w = torch.randn(8, 16, 2, 2, device=device, dtype=torch.bfloat16)
    with force_int64_index(), observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, None, 2)
    assert [launch.constants["INT64_INDEX"] for launch in launches] == [True]
    _check_output_slices(x, w, out, [(0, slice(0, 8), slice(0, 8)), (1, slice(-8, None), slice(-8, None)),
                                     (1, slice(8, 16), slice(16, 24))], "bfloat16")


# ---------------------------------------------------------------- the checks catch faults
# Faulty kernels injected through the launcher's seam: the suite's checks must catch each.

def _faulty(fault: str):
    """A launch hook that runs the real kernel with a fault: ``"drop-one-tap"`` (the
    forward reads one kernel tap as zero) or ``"corrupt-one-element"`` (one output
    element off by 2% of the output's largest magnitude)."""
    def launch(request, config):
        if fault == "drop-one-tap" and request.family == "phase_gemm":
            weight = request.args[1].clone()
            weight[..., 1, 1] = 0
            request = dataclasses.replace(request, args=(request.args[0], weight, *request.args[2:]))
        launcher.run_kernel(request, config)
        if fault == "corrupt-one-element":
            out = request.output
            out[(0, 0, *[1] * (out.dim() - 2))] += 0.02 * out.abs().max()
    return launch


@pytest.mark.parametrize("fault", ["drop-one-tap", "corrupt-one-element"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"], indirect=True)
def test_the_checks_catch_a_faulty_kernel(device, precision, fault):
    seed = fresh_seed()
    dtype = DTYPES[precision]
    x = torch.randn(4, 16, 12, 12, device=device).to(dtype)
    w = torch.randn(16, 16, 3, 3, device=device).to(dtype)
    ref = reference(x, w, None, 2, 1, 1, 1, 1)
    assert_close(tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1), ref, precision, seed)  # the healthy kernel passes
    with launcher.intercept(launch=_faulty(fault)):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1)
    with pytest.raises(AssertionError):
        assert_close(out, ref, precision, seed)


@pytest.mark.no_kernel("every launch is made to fail: the point is that the device fixture's check catches it")
def test_the_device_fixture_catches_an_aten_fallback(device, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path))
    launcher.forget_tunings()
    x, w = torch.randn(2, 20, 5, 5, device=device), torch.randn(20, 3, 4, 4, device=device)

    def launch(request, config):
        raise RuntimeError("injected")

    with observe_launches() as launches, pytest.warns(UserWarning, match="computed by aten"), \
            launcher.intercept(launch=launch, tune=True, clock=lambda run: (run(), 1.0)[1]):
        tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    launcher.forget_tunings()
    with pytest.raises(pytest.fail.Exception, match="launched no kernel"):
        require_launches(launches)


def test_a_weight_in_the_kernels_layout_is_never_copied(device, weight_copies):
    """A weight whose output channels are contiguous (a ``channels_last`` model's) is
    read as it is: inference and a training step pack nothing, and compute right."""
    seed = fresh_seed()
    layer = tritondeconv.nn.ConvTranspose2d(6, 4, 3, 2, 1, 1).to(device, torch.float64)
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.weight))
    with torch.no_grad():
        assert relative_error(layer(x), out) <= TOLERANCES["float64"], f"seed {seed}"
    assert weight_copies() == 0
    xr, wr = (t.detach().requires_grad_() for t in (x, layer.weight))
    ref = reference(xr, wr, layer.bias, 2, 1, 1, 1, 1)
    for ours, theirs in zip(grads, torch.autograd.grad(ref.square().sum(), (xr, wr))):
        assert relative_error(ours, theirs) <= TOLERANCES["float64"], f"seed {seed}"


# The ATen ops a training step of a layer may run besides our kernels: allocations (and,
# with this file's poisoned allocations, their fill), and autograd's own detaching of the
# gradient a leaf keeps (as in PyTorch's own layers' steps).
_ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::new_empty_strided", "aten::new_empty", "aten::fill_",
                "aten::detach"}


def test_a_training_step_runs_nothing_but_allocations_and_our_kernels(device):
    """A layer's forward and backward trained in the layout the kernels read (a
    channels-last model and input), the second step of its class: the ATen ops it runs
    are allocations (the output, the gradients, the weight gradient's partial sums), no
    copy of the weight, no reduction for the bias's gradient (it comes from the weight
    gradient's launch), no memset, and every gradient lands as its ``.grad`` without a
    copy.  Counted by PyTorch's profiler, which sees every ATen op where it runs (a
    dispatch mode would send the call through the op, as everything that watches must
    see it, and so watch another path); on the CPU the launches are stubbed, since the
    interpreter copies the tensors it runs on."""
    layer = tritondeconv.nn.ConvTranspose2d(16, 16, 4, 2, 1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 10, 10, device=device).contiguous(memory_format=torch.channels_last)
    with contextlib.nullcontext() if device == "cuda" else launcher.stub_launches():
        for _ in range(2):
            for t in (x, *layer.parameters()):
                t.grad = None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                out = layer(x)
                torch.autograd.backward(out, grad)
    ops = [e.name for e in profile.events() if e.name.startswith("aten::")]
    assert ops and set(ops) <= _ALLOCATIONS, sorted(set(ops) - _ALLOCATIONS)
    for t in (x, *layer.parameters()):
        assert t.grad is not None and t.grad.stride() == t.stride()
