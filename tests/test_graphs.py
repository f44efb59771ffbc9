"""CUDA graphs as a way to run: a model warmed up outside capture tunes nothing inside
it; graphs captured by ``torch.cuda.make_graphed_callables`` and by
``torch.compile(mode="reduce-overhead")`` replay what eager computes, and see an
optimizer's in-place updates of the weights."""
import copy

import pytest
import torch
from reference import assert_close, fresh_seed

import tritondeconv
from tritondeconv.kernels import tuning
from tritondeconv.kernels.common import simulate_capture

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _decoder(device, dtype=torch.float64):
    """Two transposed convolutions (with bias) around an activation, in PyTorch's modules."""
    return torch.nn.Sequential(torch.nn.ConvTranspose2d(16, 16, 4, 2, 1), torch.nn.ReLU(),
                               torch.nn.ConvTranspose2d(16, 4, 3, 2, 1, 1)).to(device, dtype)


def test_warm_up_tunes_every_layer_outside_capture_and_leaves_the_gradients(device, first_calls):
    """After ``warm_up``, a forward and backward during (simulated) capture tune nothing
    (no tuning, no warning) and compute the right values; ``warm_up`` left every
    parameter's ``.grad`` as it was."""
    seed = fresh_seed()
    theirs = _decoder(device)
    ours = tritondeconv.convert(copy.deepcopy(theirs))
    for p in ours.parameters():
        p.grad = torch.full_like(p, 7.0)
    x = torch.randn(2, 16, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    tritondeconv.warm_up(ours, x)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in ours.parameters())
    tuned = len(tuning.tuning_report())
    gy = torch.randn(2, 4, 12, 12, device=device, dtype=torch.float64)
    with simulate_capture():
        out = ours(x)
        grads = torch.autograd.grad(out, (x, *ours.parameters()), gy)
    assert len(tuning.tuning_report()) == tuned
    expected = theirs(x)
    assert_close(out, expected, "float64", seed)
    for mine, pytorchs in zip(grads, torch.autograd.grad(expected, (x, *theirs.parameters()), gy)):
        assert_close(mine, pytorchs, "float64", seed)


@pytest.mark.cuda
@needs_cuda
def test_warm_up_refuses_to_run_during_capture():
    x = torch.randn(1, 16, 2, 2, device="cuda")
    model = tritondeconv.convert(_decoder("cuda", torch.float32))
    with torch.cuda.graph(torch.cuda.CUDAGraph()), pytest.raises(RuntimeError, match="before capturing"):
        tritondeconv.warm_up(model, x)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graphed_callables_replay_eager_and_see_weight_updates(dtype):
    """``torch.cuda.make_graphed_callables`` on a converted model: forward and backward
    replays equal eager, and after an optimizer's in-place step the replay uses the new
    weights."""
    seed = fresh_seed()
    model = tritondeconv.convert(_decoder("cuda", dtype))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 16, 8, 8, device="cuda", dtype=dtype, requires_grad=True)
    tritondeconv.warm_up(model, x)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    optimizer, twin_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    precision = "tf32" if dtype == torch.float32 else "bfloat16"
    for _ in range(2):
        for m, o in ((graphed, optimizer), (twin, twin_optimizer)):
            o.zero_grad(set_to_none=False)
            m(x).square().mean().backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p.detach(), q.detach().double(), precision, seed)
    with torch.no_grad():
        assert_close(graphed(x), twin(x).double(), precision, seed)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("train", [False, True], ids=["forward", "training"])
def test_reduce_overhead_compile_captures_without_skips(train):
    """``torch.compile(model, mode="reduce-overhead")`` of a converted model captures its
    graphs with no cudagraph skip, forward and training, and computes what eager does."""
    seed = fresh_seed()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tritondeconv.convert(_decoder("cuda", torch.float32))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(4, 16, 8, 8, device="cuda", requires_grad=train)
    with torch.set_grad_enabled(train):
        for _ in range(3):
            out = compiled(x)
            if train:
                out.square().mean().backward()
        expected = eager(x)
        if train:
            expected.square().mean().backward()
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert_close(out.detach(), expected.detach().double(), "tf32", seed)
    if train:
        for p, q in zip(model.parameters(), eager.parameters()):
            assert_close(p.grad / 3, q.grad.double(), "tf32", seed)
