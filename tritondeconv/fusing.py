"""Inference fusion for ``convert(model, fuse=True)``: a batch norm that directly follows
one of our transposed convolutions is folded into its weight and bias, and the
activation module after them into the kernel's epilogue, so the block is one pass over
memory.

In inference a batch norm is a fixed per-channel affine map of the convolution's output
``z``: ``bn(z) = (z - mean) * scale + beta`` with ``scale = gamma / sqrt(var + eps)``.
Being linear, it folds into the convolution: ``w' = w * scale`` (per output channel)
and ``b' = (b - mean) * scale + beta``.  A transposed convolution's weight is
``[C_in, C_out/groups, *k]``: output channel ``o`` of group ``g`` is column
``o - g * C_out/groups`` of the input channels of group ``g``, so the scale is applied
per (group, column).  (``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)``
scales the weight's second axis as if it held every output channel: true for one group
only; it raises for more.)  The arithmetic is done in at least float32 and rounded once to the
weight's dtype.
"""
from __future__ import annotations

import torch

_BATCH_NORMS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def epilogue_of(module: torch.nn.Module) -> tuple[str, float] | None:
    """The kernel epilogue computing ``module`` (an activation module of PyTorch's),
    as ``(activation, negative_slope)``, or None when the epilogue has no such
    activation (an exact ``GELU`` only: the tanh approximation is another function)."""
    kind = type(module)
    if kind is torch.nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is torch.nn.GELU and module.approximate != "none":
        return None
    names = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.GELU: "gelu", torch.nn.Tanh: "tanh",
             torch.nn.Sigmoid: "sigmoid"}
    return (names[kind], 0.01) if kind in names else None


def batch_norm_refusal(conv: torch.nn.Module, bn: torch.nn.Module) -> str | None:
    """Why ``bn``, directly after ``conv`` (one of our transposed convolutions), cannot
    be folded into it, or None."""
    rank = len(conv.kernel_size)
    if type(bn) is not _BATCH_NORMS[rank]:
        return f"{type(bn).__name__} after a {rank}-D convolution is not a plain BatchNorm{rank}d"
    if bn.training:
        return "the batch norm is in training mode (its statistics change): call model.eval() first"
    if bn.running_mean is None or bn.running_var is None:
        return "the batch norm keeps no running statistics"
    if bn.num_features != conv.out_channels:
        return f"the batch norm has {bn.num_features} features for {conv.out_channels} channels"
    return None


@torch.no_grad()
def fold_batch_norm(conv: torch.nn.Module, bn: torch.nn.Module) -> None:
    """Fold ``bn`` into ``conv``'s weight and bias (new parameters, in place of the old
    ones; ``batch_norm_refusal`` said it can be)."""
    weight = conv.weight
    work = torch.promote_types(weight.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(work) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(work)
    shift = -bn.running_mean.to(work) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(work)
    bias = shift if conv.bias is None else conv.bias.to(work) * scale + shift
    groups, c_in, c_out_g = conv.groups, weight.shape[0], weight.shape[1]
    # w'[i, j, ...] = w[i, j, ...] * scale[g(i) * C_out/groups + j], g(i) the group of input channel i.
    per_column = scale.view(groups, 1, c_out_g, *(1,) * (weight.dim() - 2))
    folded = (weight.to(work).view(groups, c_in // groups, c_out_g, *weight.shape[2:]) * per_column).view_as(weight)
    conv.weight = torch.nn.Parameter(folded.to(weight.dtype), requires_grad=weight.requires_grad)
    conv.bias = torch.nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
