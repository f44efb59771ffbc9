"""Without TRITON_INTERPRET, CPU tensors take aten's path: forward, both gradient ops
and double backward must still agree with PyTorch there."""
import os
import subprocess
import sys

SCRIPT = r"""
import torch, torch.nn.functional as F
import tritondeconv, tritondeconv.kernels.common
assert not tritondeconv.kernels.common.INTERPRETING
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
# aten's own layouts (chosen by its CPU backends' heuristics) are restrided to what the
# fake implementations promise, so a compiled graph sees the real strides.
cl = torch.channels_last
xc, wc = x.detach().contiguous(memory_format=cl), w.detach().contiguous(memory_format=cl)
r = torch.randn(2, 6, 6, 14, dtype=torch.float64)
torch.library.opcheck(torch.ops.tritondeconv.conv_transpose2d_fused,
                      (xc, w.detach(), None, [2, 3], [1, 1], [1, 2], 2, [1, 1], "relu", 0.01, r))
torch.library.opcheck(torch.ops.tritondeconv.conv_transpose2d,
                      (x.detach(), wc, None, [2, 3], [1, 1], [1, 2], 2, [1, 1]))
for rank in (1, 3):  # (3-D float32 with batch 1: aten's CPU layout depends on its backend choice)
    xs = torch.randn(1, 4, *[3] * rank)
    ws = torch.randn(4, 3, *[2] * rank).movedim(1, -1).contiguous().movedim(-1, 1)
    torch.library.opcheck(getattr(torch.ops.tritondeconv, f"conv_transpose{rank}d"),
                          (xs, ws, None, [2] * rank, [0] * rank, [0] * rank, 1, [1] * rank))
print("fallback ok")
"""


def test_cpu_fallback_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout
