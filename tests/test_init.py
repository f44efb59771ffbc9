"""The initialisers: FCN's bilinear kernel and ICNR."""
import pytest
import torch
import torch.nn.functional as F
from reference import TOLERANCES, fresh_seed, relative_error

import tritondeconv
import tritondeconv.init


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_bilinear_reproduces_bilinear_interpolation(device, scale, depthwise):
    seed = fresh_seed()
    k = 2 * scale - scale % 2
    c = 3
    w = tritondeconv.init.bilinear_(torch.empty(c, 1 if depthwise else c, k, k, device=device, dtype=torch.float64))
    x = torch.randn(2, c, 5, 6, device=device, dtype=torch.float64)
    out = tritondeconv.conv_transpose2d(x, w, None, scale, scale // 2, 0, c if depthwise else 1)
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert out.shape == ref.shape
    m = scale  # the border, where interpolation clamps and the kernel sees padding
    assert relative_error(out[..., m:-m, m:-m], ref[..., m:-m, m:-m]) <= TOLERANCES["float64"], f"seed {seed}"
    assert relative_error(out, ref) > 1e-3  # ...and the border really differs, so the crop matters


def test_bilinear_refuses_a_channel_change():
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        tritondeconv.init.bilinear_(torch.empty(3, 2, 4, 4))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("scale, kernel", [(2, 4), (2, 3), (3, 3), (3, 5)])
def test_icnr_gives_a_constant_response_to_a_constant_input(device, rank, scale, kernel):
    seed = fresh_seed()
    w = tritondeconv.init.icnr_(torch.empty(3, 2, *(kernel,) * rank, device=device, dtype=torch.float64), scale)
    x = torch.full((1, 3, *(5,) * rank), 1.7, device=device, dtype=torch.float64)
    fn = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}[rank]
    out = fn(x, w, None, scale)
    interior = out[(..., *(slice(kernel, -kernel),) * rank)]
    per_channel = interior.flatten(2)
    spread = (per_channel.amax(-1) - per_channel.amin(-1)).abs().max()
    assert spread <= 1e-12 * per_channel.abs().max(), f"seed {seed}"
    # A freshly drawn kernel (no ICNR) would show the stride pattern: the test can fail.
    w.normal_()
    raw = fn(x, w, None, scale)[(..., *(slice(kernel, -kernel),) * rank)].flatten(2)
    assert (raw.amax(-1) - raw.amin(-1)).max() > 1e-3


def test_icnr_refuses_a_kernel_smaller_than_the_scale():
    with pytest.raises(ValueError, match="scale <= kernel_size"):
        tritondeconv.init.icnr_(torch.empty(2, 2, 2, 2), 3)
