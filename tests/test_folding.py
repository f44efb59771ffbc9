"""Nearest upsample + conv2d folded into one transposed convolution: values and gradients
against the unfused PyTorch pair, the module, and convert(model, fold_upsample=True)."""
import pytest
import torch
import torch.nn.functional as F
from reference import TOLERANCES, fresh_seed, layout, relative_error, same_layout

import tritondeconv
from tritondeconv.folding import box_convolve

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

VARIANTS = {  # groups, bias, layout
    "g1-bias-nchw": (1, True, "nchw"),
    "g2-nobias-channels_last": (2, False, "channels_last"),
    "g1-nobias-strided": (1, False, "strided"),
}


def _cases():
    for s in (2, 3):
        for k in range(1, 6):
            for p in sorted({0, k // 2, k - 1}):
                for variant in VARIANTS:
                    yield pytest.param(s, k, p, variant, id=f"s{s}-k{k}-p{p}-{variant}")


def _unfused(x, w, b, scale, padding, groups):
    return F.conv2d(F.interpolate(x, scale_factor=scale, mode="nearest"), w, b, padding=padding, groups=groups)


@pytest.mark.parametrize("s, k, p, variant", list(_cases()))
def test_upsample_conv2d_matches_the_unfused_pair(device, s, k, p, variant):
    seed = fresh_seed()
    groups, bias, kind = VARIANTS[variant]
    x = layout(torch.randn(2, 4, 3, 4, device=device, dtype=torch.float64), kind).requires_grad_()
    w = torch.randn(6, 4 // groups, k, k, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True) if bias else None
    out = tritondeconv.upsample_conv2d(x, w, b, s, p, groups)
    ref = _unfused(x, w, b, s, p, groups)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert relative_error(out, ref) <= TOLERANCES["float64"], f"seed {seed}"
    assert same_layout(out, ref)
    gy = torch.randn_like(ref)
    inputs = (x, w) + ((b,) if bias else ())
    for name, a, r in zip(("input", "weight", "bias"),
                          torch.autograd.grad(out, inputs, gy), torch.autograd.grad(ref, inputs, gy)):
        assert relative_error(a, r) <= TOLERANCES["float64"], f"grad_{name} (seed {seed})"


def test_rectangular_scale_and_kernel(device):
    seed = fresh_seed()
    x = torch.randn(1, 2, 3, 5, device=device, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 2, device=device, dtype=torch.float64)
    out = tritondeconv.upsample_conv2d(x, w, None, (2, 3), (1, 0))
    assert relative_error(out, _unfused(x, w, None, (2, 3), (1, 0), 1)) <= TOLERANCES["float64"], f"seed {seed}"


def test_folded_kernel_has_fewer_taps():
    """s=2, k=3: the folded kernel is 4x4, so every phase has 2x2 taps instead of 3x3."""
    w = torch.randn(1, 1, 3, 3)
    folded = box_convolve(w, (2, 2))
    assert folded.shape[-2:] == (4, 4)
    p = tritondeconv.plan((8, 8), (4, 4), (2, 2), (1, 1), (1, 1), (0, 0))
    assert {tuple(len(ph.taps) for ph in combo) for combo in p.phases} == {(2, 2)}


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(scale_factor=0), "scale_factor"),
    (dict(scale_factor=1.5), "scale_factor"),
    (dict(padding=3), "padding"),
    (dict(groups=4), "groups"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        tritondeconv.upsample_conv2d(torch.randn(1, 2, 3, 3), torch.randn(6, 2, 3, 3), **kwargs)


def test_module_loads_a_conv2d_checkpoint(device):
    seed = fresh_seed()
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, device=device, dtype=torch.float64)
    module = tritondeconv.nn.UpsampleConv2d(4, 6, 3, scale_factor=2, padding=1, groups=2,
                                            device=device, dtype=torch.float64)
    module.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64)
    assert relative_error(module(x), conv(F.interpolate(x, scale_factor=2))) <= TOLERANCES["float64"], f"seed {seed}"
    assert "scale_factor=2" in repr(module)


def test_convert_folds_upsample_conv_pairs(device):
    seed = fresh_seed()
    kw = dict(device=device, dtype=torch.float64)
    model = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(4, 4, 3, padding=1, **kw), torch.nn.SiLU(),
        torch.nn.Sequential(torch.nn.Upsample(scale_factor=2.0), torch.nn.Conv2d(4, 2, 3, padding=1, **kw)),
        torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.Conv2d(2, 2, 1, **kw),  # not nearest: untouched
        torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(2, 2, 3, stride=2, **kw),  # strided conv: left, named
    )
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 4, 3, 3, **kw)
    before = model(x)
    with pytest.warns(UserWarning, match=r"6\+7 \(the convolution is not stride 1"):
        assert tritondeconv.convert(model, fold_upsample=True, return_count=True) == (model, 2)
    assert isinstance(model[0], torch.nn.Identity) and type(model[1]) is tritondeconv.nn.UpsampleConv2d
    assert type(model[3][1]) is tritondeconv.nn.UpsampleConv2d and type(model[5]) is torch.nn.Conv2d
    assert relative_error(model(x), before) <= TOLERANCES["float64"], f"seed {seed}"
    model.load_state_dict(checkpoint)  # the original block's checkpoint still loads
