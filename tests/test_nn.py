"""tritondeconv.nn.ConvTranspose2d as a drop-in, convert(model), and the module in every
state: frozen and first called under inference mode, traced by torch.jit.trace, refused
by torch.jit.script, compiled by torch.compile (forward and backward)."""
import pytest
import torch
from reference import TOLERANCES, fresh_seed, relative_error

import tritondeconv

CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
         groups=2, bias=False, dilation=(1, 2)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["dcgan", "everything"])
def test_same_parameters_and_initialisation(config):
    seed = fresh_seed()
    ours = tritondeconv.nn.ConvTranspose2d(**config, dtype=torch.float64)
    torch.manual_seed(seed)
    theirs = torch.nn.ConvTranspose2d(**config, dtype=torch.float64)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


@pytest.mark.parametrize("config", CONFIGS, ids=["dcgan", "everything"])
def test_state_dicts_load_both_ways(device, config):
    fresh_seed()
    theirs = torch.nn.ConvTranspose2d(**config, device=device, dtype=torch.float64)
    ours = tritondeconv.nn.ConvTranspose2d(**config, device=device, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 3, 5, device=device, dtype=torch.float64)
    assert relative_error(ours(x), theirs(x)) <= TOLERANCES["float64"]
    back = torch.nn.ConvTranspose2d(**config, device=device, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), ours.parameters()))


def test_forward_output_size(device):
    fresh_seed()
    m = tritondeconv.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, device=device, dtype=torch.float64)
    ref = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, device=device, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 4, 4, device=device, dtype=torch.float64)
    for size in ([7, 7], [8, 8], [7, 8], torch.Size([1, 2, 8, 7])):
        out = m(x, output_size=size)
        assert out.shape[-2:] == tuple(size[-2:])
        assert relative_error(out, ref(x, output_size=size)) <= TOLERANCES["float64"]
    with pytest.raises(ValueError, match="output size"):
        m(x, output_size=[10, 10])


def test_padding_mode_other_than_zeros_is_refused():
    with pytest.raises(ValueError, match='Only "zeros" padding mode'):
        tritondeconv.nn.ConvTranspose2d(2, 2, 3, padding_mode="reflect")


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", ["ConvTranspose", "ConcatUpsample"])
def test_padding_mode_set_after_construction_is_refused_as_pytorch_refuses_it(rank, kind):
    """PyTorch's transposed convolutions check ``padding_mode`` in ``forward``: changed
    after construction, it raises there, and so do ours (never computing with zeros)."""
    theirs = getattr(torch.nn, f"ConvTranspose{rank}d")(2, 2, 3)
    ours = getattr(tritondeconv.nn, f"{kind}{rank}d")(2, 2, 3)
    x = torch.randn(1, 2, *(4,) * rank)
    args = (x,) if kind == "ConvTranspose" else (x, torch.randn(1, 1, *(6,) * rank))
    for module in (theirs, ours):
        module.padding_mode = "reflect"
    with pytest.raises(ValueError) as pytorchs:
        theirs(x)
    with pytest.raises(ValueError) as raised:
        ours(*args)
    assert str(raised.value) == str(pytorchs.value).replace("ConvTranspose", kind)


def test_upsample_conv2d_refuses_a_padding_mode_that_does_not_fold():
    """Only zero padding folds into a transposed convolution: another ``padding_mode``
    (which a ``Conv2d`` would honour) is refused in ``forward``, never computed with zeros."""
    m = tritondeconv.nn.UpsampleConv2d(2, 2, 3, scale_factor=2, padding=1)
    m.padding_mode = "reflect"
    with pytest.raises(ValueError, match="Only `zeros` padding mode is supported for UpsampleConv2d"):
        m(torch.randn(1, 2, 4, 4))


class _Generator(torch.nn.Module):
    """A small DCGAN-style generator."""

    def __init__(self, dtype=torch.float64, device="cpu"):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(8, 6, 4, 1, 0, bias=False, **kw),
            torch.nn.BatchNorm2d(6, **kw),
            torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.ConvTranspose2d(6, 4, 4, 2, 1, bias=False, **kw), torch.nn.ReLU()),
            torch.nn.ConvTranspose2d(4, 3, 4, 2, 1, **kw),
            torch.nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z)


def test_convert_swaps_in_place(device):
    fresh_seed()
    model = _Generator(device=device).eval()
    model.extra = torch.nn.LazyConvTranspose2d(3, 2)
    z = torch.randn(2, 8, 1, 1, device=device, dtype=torch.float64)
    before = model(z)
    weight = model.net[0].weight
    with pytest.warns(UserWarning,
                      match=r"left 1 module\(s\) unchanged: extra \(its parameters are not initialised yet\)"):
        assert tritondeconv.convert(model, return_count=True) == (model, 3)
    assert all(type(m) is tritondeconv.nn.ConvTranspose2d for m in (model.net[0], model.net[3][0], model.net[4]))
    assert model.net[0].weight is weight and weight.device.type == device and weight.dtype == torch.float64
    assert relative_error(model(z), before) <= TOLERANCES["float64"]
    with pytest.warns(UserWarning, match="extra"):  # nothing left to swap; the lazy one is named again
        assert tritondeconv.convert(model, return_count=True) == (model, 0)


def test_frozen_module_first_called_in_inference_mode_then_with_an_input_gradient(device):
    """The packed weight cached under inference mode serves later calls outside it,
    autograd included."""
    seed = fresh_seed()
    ours = tritondeconv.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, device=device, dtype=torch.float64)
    theirs = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, device=device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    with torch.inference_mode():
        x = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64)
        assert relative_error(ours(x), theirs(x)) <= TOLERANCES["float64"], f"seed {seed}"
    x = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(x_ours), theirs(x_theirs)
    assert relative_error(out, ref) <= TOLERANCES["float64"], f"seed {seed}"
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert relative_error(x_ours.grad, x_theirs.grad) <= TOLERANCES["float64"], f"seed {seed}"


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_jit_trace_of_a_converted_model(device, grad_mode):
    """``torch.jit.trace`` with its default checks (which retrace under ``no_grad``, where
    the module would otherwise use its cached packed weight): the trace records the
    parameters, so it follows their updates, and computes what the eager model does on
    a new input."""
    seed = fresh_seed()
    model = _Generator(device=device).eval()
    tritondeconv.convert(model)
    z = torch.randn(2, 8, 1, 1, device=device, dtype=torch.float64)
    with torch.no_grad():
        model(z)  # (caches the packed weights)
    with torch.set_grad_enabled(grad_mode == "grad"):
        traced = torch.jit.trace(model, z)
    z = torch.randn(2, 8, 1, 1, device=device, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(traced(z), model(z)) <= TOLERANCES["float64"], f"seed {seed}"
        for p in model.parameters():
            p.mul_(0.5)
        assert relative_error(traced(z), model(z)) <= TOLERANCES["float64"], f"after an update (seed {seed})"


SCRIPTED = {
    "ConvTranspose1d": lambda: tritondeconv.nn.ConvTranspose1d(2, 2, 3),
    "ConvTranspose2d": lambda: tritondeconv.nn.ConvTranspose2d(2, 2, 3),
    "ConvTranspose3d": lambda: tritondeconv.nn.ConvTranspose3d(2, 2, 3),
    "UpsampleConv2d": lambda: tritondeconv.nn.UpsampleConv2d(2, 2, 3),
    "inside-a-model": lambda: torch.nn.Sequential(torch.nn.ReLU(), tritondeconv.nn.ConvTranspose2d(2, 2, 3)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("module", SCRIPTED)
def test_jit_script_is_refused_with_what_to_use_instead(module):
    with pytest.raises(RuntimeError, match=r"scripting is not supported for tritondeconv\.nn\..*torch\.jit\.trace.*"
                                           r"torch\.compile"):
        torch.jit.script(SCRIPTED[module]())


def test_compile_fullgraph_forward_and_backward(device):
    seed = fresh_seed()
    model = _Generator(device=device)
    tritondeconv.convert(model)
    eager = _Generator(device=device)
    eager.load_state_dict(model.state_dict())
    z = torch.randn(2, 8, 1, 1, device=device, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(z)
    out.square().mean().backward()
    ref = eager(z)
    ref.square().mean().backward()
    assert relative_error(out, ref) <= TOLERANCES["float64"], f"seed {seed}"
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert relative_error(p.grad, q.grad) <= 1e-10, f"grad of {name} (seed {seed})"


class _Decoder(torch.nn.Module):
    """A U-Net decoder stage: PyTorch's transposed convolution (which ``convert`` swaps),
    our concatenating and folding modules, and a call of our function."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 3, 4, 2, 1)
        self.up_cat = tritondeconv.nn.ConcatUpsample2d(3, 2, 2, 2)
        self.fold = tritondeconv.nn.UpsampleConv2d(5, 2, 3, scale_factor=2, padding=1)

    def forward(self, x, skip):
        y = self.fold(self.up_cat(torch.relu(self.up(x)), skip))
        return y + tritondeconv.conv_transpose2d(x, self.up.weight[:, :2], None, stride=10)


def test_symbolic_trace_of_a_converted_model_records_our_calls(device):
    """``torch.fx.symbolic_trace`` traces a converted model as it traces PyTorch's
    modules: each call of our modules and functions is one node of the graph (not
    traced into), and the traced module computes what the model computes."""
    seed = fresh_seed()
    model = tritondeconv.convert(_Decoder().to(device, torch.float64))
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64)
    skip = torch.randn(2, 3, 12, 12, device=device, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(model)
    ours = {node.target.__name__ for node in traced.graph.nodes if node.op == "call_function"}
    assert {"conv_transpose_cat", "upsample_conv2d", "conv_transpose2d"} <= ours
    assert relative_error(traced(x, skip), model(x, skip)) <= TOLERANCES["float64"], f"seed {seed}"
