"""tritondeconv: transposed convolution by stride-phase decomposition, in Triton.

``conv_transpose{1,2,3}d`` mirror ``torch.nn.functional``'s (differentiable, twice);
``nn.ConvTranspose{1,2,3}d`` mirror the modules and ``convert`` swaps them into a model;
``naive_conv_transpose2d`` is the zero-insertion baseline on the same kernel;
``plan`` describes the decomposition (see ``python -m tritondeconv.explain``);
``tuning_report`` lists what the process has tuned; ``set_backend("auto")`` lets aten's
convolution race our kernels per shape; ``enable()`` / ``with enabled():`` route PyTorch's own
transposed convolutions in unchanged code to our kernels; ``warm_up(model, *inputs)``
tunes a model's layers before a CUDA-graph capture.
"""
from . import (
    init,
    nn,
    registrations,  # noqa: F401  (registers the ops)
)
from .backends import get_backend, set_backend
from .convert import convert
from .folding import upsample_conv2d
from .functional import conv_transpose1d, conv_transpose2d, conv_transpose3d, naive_conv_transpose2d
from .graphs import warm_up
from .kernels.planner import Plan, plan
from .kernels.tuning import tuning_report
from .nn import clear_weight_cache
from .switch import disable, enable, enabled, is_enabled

__all__ = [
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "naive_conv_transpose2d", "upsample_conv2d",
    "clear_weight_cache", "init", "nn", "convert", "plan", "Plan", "tuning_report", "set_backend", "get_backend",
    "enable", "disable", "enabled", "is_enabled", "warm_up",
]
__version__ = "0.1.0"
