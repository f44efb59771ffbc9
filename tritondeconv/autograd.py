"""Autograd for the ops, written in terms of the ops themselves so that every
gradient is differentiable again (double backward, gradgradcheck).

For ``y = T(x, w)`` (transposed convolution; stride s, padding p, dilation d, groups g):

    grad_x = I(grad_y, w)        conv_transpose_input_grad: the strided convolution
    grad_w = W(x, grad_y)        conv_transpose_weight_grad: per-tap GEMMs
    grad_b = Σ_{n, spatial} grad_y

``I`` and ``W`` are bilinear, and their own gradients close the set:

    I(gy, w):  d gy = T(g, w),    d w = W(g, gy)
    W(x, gy):  d x  = I(gy, g),   d gy = T(x, g)

where ``g`` is the incoming gradient; ``T`` gets the output_padding that reproduces
``gy``'s size.  Only the gradients that are needed are computed.
"""
from __future__ import annotations

import torch

from .arguments import ntuple
from .ops import transposed_output_padding

ops = torch.ops.tritondeconv


def _transposed(rank: int):
    """The forward op of a spatial rank."""
    return {1: ops.conv_transpose1d, 2: ops.conv_transpose2d, 3: ops.conv_transpose3d}[rank]


def _T(x, w, grad_y_size, stride, padding, dilation, groups):
    """T(x, w) sized like ``grad_y_size``."""
    output_padding = transposed_output_padding(x.shape[2:], grad_y_size, w.shape[2:], stride, padding, dilation)
    return _transposed(x.dim() - 2)(x, w, None, stride, padding, output_padding, groups, dilation)


# --------------------------------------------------------------- conv_transpose{1,2,3}d


def _save_geometry(ctx, weight, bias, stride, padding, groups, dilation):
    rank = weight.dim() - 2
    ctx.has_bias = bias is not None
    ctx.geometry = tuple(list(ntuple(v, rank, n, "conv_transpose")) for v, n in
                         ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    ctx.groups = groups


def _setup_conv_transpose(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(input, weight)
    _save_geometry(ctx, weight, bias, stride, padding, groups, dilation)


def _grads(ctx, x, w, grad_y):
    """grad_input, grad_weight, grad_bias of T, each only if needed."""
    stride, padding, dilation = ctx.geometry
    unbatched = x.dim() == w.dim() - 1
    if unbatched:
        x, grad_y = x.unsqueeze(0), grad_y.unsqueeze(0)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.conv_transpose_input_grad(grad_y, w, list(x.shape[2:]), stride, padding, dilation, ctx.groups)
        grad_x = grad_x.squeeze(0) if unbatched else grad_x
    if ctx.needs_input_grad[1]:
        grad_w = ops.conv_transpose_weight_grad(x, grad_y, list(w.shape[2:]), stride, padding, dilation, ctx.groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:  # (under compile the flags cover given tensors only)
        grad_b = grad_y.sum(dim=[0, *range(2, grad_y.dim())])
    return grad_x, grad_w, grad_b


def _backward_conv_transpose(ctx, grad_y):
    x, w = ctx.saved_tensors
    return *_grads(ctx, x, w, grad_y), None, None, None, None, None


for _rank in (1, 2, 3):
    torch.library.register_autograd(
        f"tritondeconv::conv_transpose{_rank}d", _backward_conv_transpose, setup_context=_setup_conv_transpose
    )


# --------------------------------------------------------------- conv_transpose2d_fused
# y = act(T(x, w) + b) + r:  grad_r = gy, and T's gradients of gz = gy * act'(z) with
# z = T(x, w) + b recomputed (one more forward, instead of keeping z in memory).


def _activation_derivative(z: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    """act'(z), written with differentiable ops (for double backward)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    s = torch.sigmoid(z)  # sigmoid
    return s * (1 - s)


def _setup_fused(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation, activation, slope, residual = inputs
    ctx.save_for_backward(input, weight, bias)
    _save_geometry(ctx, weight, bias, stride, padding, groups, dilation)
    ctx.epilogue = (stride, padding, output_padding, groups, dilation, activation, slope)
    ctx.has_residual = residual is not None


def _backward_fused(ctx, grad_y):
    x, w, b = ctx.saved_tensors
    stride, padding, output_padding, groups, dilation, activation, slope = ctx.epilogue
    grad_z = grad_y
    if activation is not None:
        z = ops.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
        # act'(z) * grad_y in at least fp32, rounded once to the gradient's dtype.
        wide = torch.promote_types(z.dtype, torch.float32)
        grad_z = (grad_y.to(wide) * _activation_derivative(z.to(wide), activation, slope)).to(grad_y.dtype)
    grad_r = grad_y if ctx.has_residual and ctx.needs_input_grad[-1] else None
    return *_grads(ctx, x, w, grad_z), None, None, None, None, None, None, None, grad_r


torch.library.register_autograd("tritondeconv::conv_transpose2d_fused", _backward_fused, setup_context=_setup_fused)


# --------------------------------------------------------------- I(gy, w) and W(x, gy)


def _setup_gradient_op(ctx, inputs, output):
    """Both gradient ops take (tensor, tensor, size, stride, padding, dilation, groups)."""
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.geometry = tuple(inputs[3:])


def _backward_input_grad(ctx, g):
    grad_y, w = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_grad_y = d_w = None
    if ctx.needs_input_grad[0]:
        d_grad_y = _T(g, w, grad_y.shape[2:], stride, padding, dilation, groups)
    if ctx.needs_input_grad[1]:
        d_w = ops.conv_transpose_weight_grad(g, grad_y, list(w.shape[2:]), stride, padding, dilation, groups)
    return d_grad_y, d_w, None, None, None, None, None


def _backward_weight_grad(ctx, g):
    x, grad_y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_x = d_grad_y = None
    if ctx.needs_input_grad[0]:
        d_x = ops.conv_transpose_input_grad(grad_y, g, list(x.shape[2:]), stride, padding, dilation, groups)
    if ctx.needs_input_grad[1]:
        d_grad_y = _T(x, g, grad_y.shape[2:], stride, padding, dilation, groups)
    return d_x, d_grad_y, None, None, None, None, None


torch.library.register_autograd(
    "tritondeconv::conv_transpose_input_grad", _backward_input_grad, setup_context=_setup_gradient_op
)
torch.library.register_autograd(
    "tritondeconv::conv_transpose_weight_grad", _backward_weight_grad, setup_context=_setup_gradient_op
)
