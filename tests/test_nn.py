"""tritondeconv.nn.ConvTranspose2d as a drop-in, convert(model), and torch.compile of
a model built from it (forward and backward)."""
import pytest
import torch

import tritondeconv
from reference import TOLERANCES, fresh_seed, relative_error

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
    with pytest.warns(UserWarning, match=r"left 1 module\(s\) unchanged: extra \(its parameters are not initialised yet\)"):
        assert tritondeconv.convert(model) == 3
    assert all(type(m) is tritondeconv.nn.ConvTranspose2d for m in (model.net[0], model.net[3][0], model.net[4]))
    assert model.net[0].weight is weight and weight.device.type == device and weight.dtype == torch.float64
    assert relative_error(model(z), before) <= TOLERANCES["float64"]
    with pytest.warns(UserWarning, match="extra"):  # nothing left to swap; the lazy one is named again
        assert tritondeconv.convert(model) == 0


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
