"""The global switch: PyTorch's own transposed convolutions in unchanged code run our
kernels while it is on, and aten's exactly once it is off."""
import threading

import pytest
import torch
import torch.nn as nn
from reference import assert_close, fresh_seed

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.kernels.common import observe_launches


def _model(device):
    """A decoder as users write it: PyTorch modules only, 1-D, 2-D and 3-D transposed
    convolutions beside an ordinary convolution."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.up1 = nn.ConvTranspose1d(4, 3, 4, 2, 1)
            self.up2 = nn.ConvTranspose2d(4, 3, 3, 2, 1, 1, groups=1, dilation=1)
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            self.up3 = nn.ConvTranspose3d(2, 2, 2, 2)

        def forward(self, a, b, c):
            return self.up1(a).sum() + self.conv(torch.relu(self.up2(b))).sum() + self.up3(c).square().sum()

    return Decoder().to(device, torch.float64)


def _inputs(device):
    return (torch.randn(2, 4, 5, device=device, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, 3, 4, device=device, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 2, 2, 3, 2, device=device, dtype=torch.float64, requires_grad=True))


def _run(model, inputs):
    out = model(*inputs)
    return out, torch.autograd.grad(out.sum(), [*inputs, *model.parameters()])


def test_unchanged_model_runs_our_kernels_while_enabled(device):
    seed = fresh_seed()
    model, inputs = _model(device), _inputs(device)
    ref, ref_grads = _run(model, inputs)  # aten
    with tritondeconv.enabled(), observe_launches() as launches:
        assert tritondeconv.is_enabled()
        out, grads = _run(model, inputs)
    assert not tritondeconv.is_enabled()
    # Three transposed convolutions, forward, input gradient and weight gradient each (the
    # bias's gradient from the weight gradient's launch, added up by its split sum).
    assert sorted(launch.kernel for launch in launches) == ["phase_gemm"] * 6 + ["split_sum"] * 3 + ["weight_grad"] * 3
    assert_close(out, ref, "float64", seed)
    for ours, theirs in zip(grads, ref_grads):
        assert_close(ours, theirs, "float64", seed)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference tensors"])
def test_calls_without_autograd_run_our_kernels_while_enabled(device, mode):
    """Where autograd is skipped (``torch.inference_mode``, inference tensors) or records
    nothing (``torch.no_grad``), an unchanged model still runs our kernels."""
    seed = fresh_seed()
    up = nn.ConvTranspose2d(4, 3, 3, 2, 1, 1).to(device, torch.float64)
    x = torch.randn(2, 4, 3, 4, device=device, dtype=torch.float64)
    with torch.no_grad():
        expected = up(x)
    with torch.inference_mode() if mode != "no_grad" else torch.no_grad():
        x = x.clone() if mode == "inference tensors" else x
        with tritondeconv.enabled(), observe_launches() as launches:
            out = up(x)
    assert [launch.kernel for launch in launches] == ["phase_gemm"]
    assert_close(out, expected, "float64", seed)


@pytest.mark.no_kernel("inside a torch.func transform the switch leaves convolutions to aten")
@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev", "vmap"])
def test_function_transforms_over_unchanged_code_work_while_enabled(device, transform):
    """``torch.func`` transforms of code that calls PyTorch's own transposed convolution
    give what they give without the switch (aten computes the convolutions inside a
    transform)."""
    seed = fresh_seed()
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64)
    up = lambda x: torch.nn.functional.conv_transpose2d(x, w, None, 2, 1, 1)  # noqa: E731
    run = {"grad": lambda: torch.func.grad(lambda x: up(x).square().sum())(x),
           "jvp": lambda: torch.func.jvp(up, (x,), (torch.ones_like(x),))[1],
           "jacrev": lambda: torch.func.jacrev(up)(x[:1]),
           "vmap": lambda: torch.func.vmap(up)(x.unsqueeze(1))}[transform]
    expected = run()
    with tritondeconv.enabled():
        assert_close(run(), expected, "float64", seed)


@pytest.mark.no_kernel("checks that nothing of ours runs once the switch is off")
def test_disable_restores_aten_exactly(device):
    model, inputs = _model(device), _inputs(device)
    dispatch_before = torch._C._dispatch_dump("aten::convolution")
    ref, ref_grads = _run(model, inputs)
    tritondeconv.enable()
    tritondeconv.enable()  # idempotent
    tritondeconv.disable()
    tritondeconv.disable()
    with observe_launches() as launches:
        out, grads = _run(model, inputs)
    assert launches == [] and torch._C._dispatch_dump("aten::convolution") == dispatch_before
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.no_kernel("an ordinary convolution is left to aten")
def test_ordinary_convolutions_stay_atens(device):
    conv = nn.Conv2d(3, 4, 3, 2, 1).to(device, torch.float64)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _run(conv, (x,))
    with tritondeconv.enabled(), observe_launches() as launches:
        out, grads = _run(conv, (x,))
    assert launches == [] and torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.no_kernel("every launch is made to fail, so aten computes the call")
def test_our_own_fallback_inside_the_switch_does_not_reenter_it(device, tmp_path, monkeypatch):
    """When no configuration runs, our op computes aten's convolution itself; under the
    switch that call goes to aten, not back into the switch."""
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path))
    launcher.forget_tunings()
    up = nn.ConvTranspose2d(20, 3, 4, 2, 1).to(device, torch.float64)
    x = torch.randn(2, 20, 5, 5, device=device, dtype=torch.float64)
    ref = up(x)

    def launch(request, config):
        raise RuntimeError("injected: no configuration runs")

    attempts = []
    with tritondeconv.enabled(), launcher.intercept(tune=True, clock=lambda run: (attempts.append(1), run(), 1.0)[2],
                                                   launch=launch), \
            pytest.warns(UserWarning, match="computed by aten's convolution instead"):
        out = up(x)
    launcher.forget_tunings()
    assert attempts and torch.equal(out, ref)


def test_switching_from_many_threads_leaves_a_consistent_state(device):
    """Four threads enabling and disabling at once: afterwards the dispatch table is
    aten's again, and one more enable() still routes to our kernels."""
    dispatch_before = torch._C._dispatch_dump("aten::convolution")

    def flip(n):
        for i in range(n):
            (tritondeconv.enable if i % 2 == 0 else tritondeconv.disable)()
    threads = [threading.Thread(target=flip, args=(50 + t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tritondeconv.disable()
    assert not tritondeconv.is_enabled() and torch._C._dispatch_dump("aten::convolution") == dispatch_before
    x, w = torch.randn(1, 2, 3, 3, device=device), torch.randn(2, 2, 3, 3, device=device)
    with tritondeconv.enabled(), observe_launches() as launches:
        torch.nn.functional.conv_transpose2d(x, w)
    assert [launch.kernel for launch in launches] == ["phase_gemm"]


def test_compiled_model_under_the_switch_is_correct(device):
    """``torch.compile`` (aot_eager, which runs the traced aten graph through the
    dispatcher) of an unchanged model under the switch: our kernels run its forward."""
    seed = fresh_seed()
    up = nn.ConvTranspose2d(4, 3, 3, 2, 1, 1).to(device, torch.float64)
    x = torch.randn(2, 4, 3, 4, device=device, dtype=torch.float64)
    ref = up(x)
    torch._dynamo.reset()
    with tritondeconv.enabled(), observe_launches() as launches, torch.no_grad():
        out = torch.compile(up, backend="aot_eager", fullgraph=True)(x)
    assert [launch.kernel for launch in launches] == ["phase_gemm"]
    assert_close(out, ref, "float64", seed)
