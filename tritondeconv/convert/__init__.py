"""``convert(model)``: turn PyTorch's transposed convolutions into tritondeconv's, in place,
and optionally fold upsamplings and fuse inference blocks into them.

``swap`` makes a module ours by a change of class.  The folds are decided once, in
``rules``, and applied by two passes: ``sequential`` over the children of every
``nn.Sequential`` (in place) and ``traced`` over the forward code as ``torch.fx`` traces
it (in a new ``GraphModule``).
"""
from __future__ import annotations

import warnings

import torch

from . import sequential, swap, traced
from .swap import OURS, SWAPS

__all__ = ["SWAPS", "convert"]


def convert(model: torch.nn.Module, fold_upsample: bool = False, return_count: bool = False,
            fuse: bool = False) -> torch.nn.Module | tuple[torch.nn.Module, int]:
    """Turn every ``torch.nn.ConvTranspose{1,2,3}d`` in ``model`` (``model`` itself
    included) into ``tritondeconv.nn.ConvTranspose{1,2,3}d``, in place, and return
    ``model`` (so ``model = convert(model)`` works too).

    Each module keeps its identity, wherever and however often it is registered, with
    its parameters (optimizers keep working), buffers, hooks, training mode and
    state-dict keys; modules under the old-style ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` or ``torch.nn.utils.parametrize`` parametrizations keep them.

    With ``fold_upsample``, every nearest ``Upsample`` + ``Conv2d`` pair inside an
    ``nn.Sequential`` becomes ``Identity`` + ``tritondeconv.nn.UpsampleConv2d`` (the same
    convolution module, its class changed), unless the convolution is also used
    elsewhere or either module has hooks; then the forward code is traced with
    ``torch.fx`` and every ``F.interpolate(x, scale_factor=k, mode="nearest")`` (or
    ``nn.Upsample`` call) feeding only a ``Conv2d`` module is folded too (the
    diffusers / SD-VAE style).  Folding forward code needs a new module: the returned
    model is then a ``torch.fx.GraphModule`` sharing the parameters (use the return
    value; the model passed in keeps working unfolded).

    With ``fuse``, for inference (a model in eval mode; a model in training mode is left
    unfused, with the warning): inside every ``nn.Sequential``, each ``BatchNorm{1,2,3}d``
    directly after a converted transposed convolution is folded into its weight and
    bias (new parameters), and a following activation module (``ReLU``, ``LeakyReLU``,
    ``SiLU``, exact ``GELU``, ``Tanh``, ``Sigmoid``), or one directly after the
    convolution, into its epilogue; their places take ``Identity`` modules, so the
    block is one kernel.  The model then computes the same in inference, but its state
    dict holds the folded parameters (the batch norms' entries are gone): fuse a copy
    to keep the original.  Then the forward code is traced with ``torch.fx``: the same
    blocks written there are fused into new modules, and each ``torch.cat([up(x), skip],
    1)`` of one of our convolutions' output becomes a ``ConcatUpsample`` (the
    convolution writing straight into the concatenation); the returned model is then a
    ``torch.fx.GraphModule`` and the model passed in keeps computing as before.  A
    convolution used elsewhere too, parametrized, already applying an activation, or a
    block with hooks is left, named.

    What it cannot take is left as it is, named in one warning: subclasses of PyTorch's
    modules with behaviour of their own, unsupported dtypes, uninitialised lazy
    modules.  With ``return_count``, returns ``(model, count)``: how many modules were
    converted, pairs folded and blocks fused.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: expected model to be a torch.nn.Module, but got {type(model).__name__}")
    converted, left = 0, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.modules.conv._ConvTransposeNd) or isinstance(module, OURS):
            continue
        why = swap.refusal(module)
        if why is None:
            swap.make_ours(module)
            converted += 1
        else:
            left.append(f"{name or 'the model itself'} ({why})")
    if fuse and model.training:
        left.append("the batch norms and activations after the transposed convolutions (fuse=True is for inference, "
                    "and the model is in training mode: call model.eval() first)")
        fuse = False
    if fuse:
        converted += sequential.fuse(model, left)
    if fold_upsample:
        converted += sequential.fold_upsamples(model, left)
    if fuse or fold_upsample:
        model, changed = traced.rewrite(model, left, fuse=fuse, fold_upsample=fold_upsample)
        converted += changed
    if left:
        warnings.warn(f"tritondeconv.convert left {len(left)} module(s) unchanged: " + "; ".join(left), stacklevel=2)
    return (model, converted) if return_count else model
