"""tritondeconv: transposed convolution by stride-phase decomposition, in Triton.

``conv_transpose2d`` mirrors ``torch.nn.functional.conv_transpose2d``;
``naive_conv_transpose2d`` is the zero-insertion baseline on the same kernel;
``plan`` describes the decomposition (see ``python -m tritondeconv.explain``).
"""
from .ops import conv_transpose2d, naive_conv_transpose2d
from .planner import Plan, plan

__all__ = ["conv_transpose2d", "naive_conv_transpose2d", "plan", "Plan"]
__version__ = "0.1.0"
