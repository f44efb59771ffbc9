"""tritondeconv: transposed convolution by stride-phase decomposition, in Triton.

``conv_transpose2d`` mirrors ``torch.nn.functional.conv_transpose2d`` (differentiable,
twice); ``nn.ConvTranspose2d`` mirrors the module and ``convert`` swaps it into a
model; ``naive_conv_transpose2d`` is the zero-insertion baseline on the same kernel;
``plan`` describes the decomposition (see ``python -m tritondeconv.explain``).
"""
from . import autograd  # noqa: F401  (registers the gradients)
from . import nn
from .convert import convert
from .ops import conv_transpose2d, naive_conv_transpose2d
from .planner import Plan, plan

__all__ = ["conv_transpose2d", "naive_conv_transpose2d", "nn", "convert", "plan", "Plan"]
__version__ = "0.1.0"
