"""A short training run on the GPU: a DCGAN generator built from tritondeconv's layers
and the same generator built from PyTorch's learn the same thing the same way."""
import pytest
import torch

import tritondeconv

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def _generator(nz=32, ngf=32):
    """DCGAN's generator (Radford et al.), 1x1 latent -> 3x32x32 image."""
    return torch.nn.Sequential(
        torch.nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), torch.nn.BatchNorm2d(ngf * 4), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(ngf * 2), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(ngf), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), torch.nn.Tanh(),
    )


def _train(model, z, target, steps):
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(z), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def test_dcgan_generator_trains_like_pytorchs():
    """Same seed, same data, exact fp32 (TF32 off), 300 Adam steps regressing fixed
    targets from fixed latents.

    Tolerance: each step's loss may differ by 1e-3 relative.  The two models differ only
    in the order of fp32 additions (~1e-7 relative per op); Adam's normalisation lets
    such differences grow over training, but on a smooth regression like this one they
    should stay orders of magnitude below 1e-3, while a wrong gradient (scale, sign, a missed tap) changes the curve by O(1)
    within tens of steps, so 1e-3 separates the two cases with margin.  The loss must
    also fall, so that agreeing curves mean both learned."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        z = torch.randn(64, 32, 1, 1, device="cuda")
        target = torch.rand(64, 3, 32, 32, device="cuda") * 2 - 1
        theirs = _generator().cuda()
        ours = _generator().cuda()
        ours.load_state_dict(theirs.state_dict())
        assert tritondeconv.convert(ours, return_count=True) == (ours, 4)
        curve_theirs = _train(theirs, z, target, 300)
        curve_ours = _train(ours, z, target, 300)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert curve_ours[-1] < 0.8 * curve_ours[0]
    rel = ((curve_ours - curve_theirs).abs() / curve_theirs.abs()).max().item()
    assert rel < 1e-3, f"loss curves differ by {rel:.2e} relative"
