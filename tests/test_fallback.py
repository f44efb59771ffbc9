"""Without TRITON_INTERPRET, CPU tensors take aten's path: forward, both gradient ops
and double backward must still agree with PyTorch there."""
import os
import subprocess
import sys

SCRIPT = r"""
import torch, torch.nn.functional as F
import tritondeconv, tritondeconv.ops
assert not tritondeconv.ops.INTERPRETING
torch.manual_seed(0)
x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
b = torch.randn(6, dtype=torch.float64, requires_grad=True)
args = ((2, 3), 1, (1, 2), 2, (1, 1))
fn = lambda x, w, b: tritondeconv.conv_transpose2d(x, w, b, *args)
ref = F.conv_transpose2d(x, w, b, *args)
assert torch.allclose(fn(x, w, b), ref)
gy = torch.randn_like(ref)
for a, r in zip(torch.autograd.grad(fn(x, w, b), (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
    assert torch.allclose(a, r), (a - r).abs().max()
assert torch.autograd.gradgradcheck(fn, (x, w, b))
assert torch.allclose(tritondeconv.naive_conv_transpose2d(x, w, b, *args), ref)
print("fallback ok")
"""


def test_cpu_fallback_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout
