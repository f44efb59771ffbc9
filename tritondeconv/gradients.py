"""The gradients of the ops, written in terms of the ops themselves so that every
gradient is differentiable again (double backward, gradgradcheck).

For ``y = T(x, w)`` (transposed convolution; stride s, padding p, dilation d, groups g):

    grad_x = I(grad_y, w)        conv_transpose_input_grad: the strided convolution
    grad_w = W(x, grad_y)        conv_transpose_weight_grad: taps as GEMM columns
    grad_b = Σ_{n, spatial} grad_y

``I`` and ``W`` are bilinear, and their own gradients close the set:

    I(gy, w):  d gy = T(g, w),    d w = W(g, gy)
    W(x, gy):  d x  = I(gy, g),   d gy = T(x, g)

where ``g`` is the incoming gradient; ``T`` gets the output_padding that reproduces
``gy``'s size.  Only the gradients that are needed are computed.  With an epilogue,
``y = act(T(x, w) + b) + r``: ``grad_r = gy``, and ``T``'s gradients are those of
``gz = gy * act'(z)``, ``z`` recomputed (one more forward instead of keeping ``z``).

One ``torch.autograd.Function`` per op (``ConvTranspose``, ``InputGrad``,
``WeightGrad``), with ``setup_context``, ``backward``, ``jvp`` and ``vmap``: the op's
autograd (``registrations``), and what the public functions run under a
``torch.func`` transform or forward-mode AD.  Being bilinear, each op's tangent is the
op applied to the tangents: ``dT = T(dx, w) + T(x, dw)`` (plus the bias's), and so on.
``Recorded`` is the public functions' short way on plain tensors (``dispatch``): a
prepared forward (``prepared.Forward``) recorded, whose backward, when no graph of it
is wanted (``create_graph`` off), runs the prepared gradients directly on the weight as
the forward read it.
"""
from __future__ import annotations

import collections

import torch

from . import dispatch
from .kernels.activations import TABLE as ACTIVATION_TABLE
from .prepared import first_forward, input_grad, prepared_forward, transposed_output_padding, weight_grad_of
from .weights import PACKED, ThreadDepth

ops = torch.ops.tritondeconv

_CARRIED = ThreadDepth()  # how many of these Functions are running their forward, in this thread

# How the recorded backwards of this process ran: "prepared" (the prepared gradients
# called directly) or "ops" (through the ops, as with create_graph or an epilogue).  A
# seam for perf/host_overhead.py, which reports the route a GPU's backward takes on the
# autograd engine's device thread, where no Python-level profiler sees it.
ROUTES: collections.Counter = collections.Counter()


def tangents_carried() -> ThreadDepth:
    """The ops called in the block are called by a Function here, which carries their
    forward-mode tangents itself (the ops refuse forward-mode AD otherwise)."""
    return _CARRIED


def _add(a, b):
    """``a + b`` where either may be None (a missing gradient or tangent)."""
    return b if a is None else a if b is None else a + b


def _T(x, w, grad_y_size, stride, padding, dilation, groups):
    """T(x, w) sized like ``grad_y_size``."""
    output_padding = transposed_output_padding(x.shape[2:], grad_y_size, w.shape[2:], stride, padding, dilation)
    return dispatch.conv_transpose(x, w, None, (stride, padding, output_padding, groups, dilation), None, 0.01, None)


# --------------------------------------------------------------- y = act(T(x, w) + b) + r


def _activation_slope(x, w, b, geometry, activation, slope):
    """act'(z) at z = T(x, w) + b, in at least fp32, or None without an activation."""
    if activation is None:
        return None
    z = dispatch.conv_transpose(x, w, b, geometry, None, 0.01, None)
    return ACTIVATION_TABLE[activation].derivative(z.to(torch.promote_types(z.dtype, torch.float32)), slope)


def conv_transpose_gradients(x, w, b, grad_y, geometry: tuple, activation, slope, has_residual: bool,
                             needs) -> tuple:
    """grad_input, grad_weight, grad_bias, grad_residual of ``y = act(T(x, w) + b) + r``
    (``geometry``: the op's five integer arguments), each only if ``needs`` it (the
    flags of (input, weight, bias, residual)), through the ops (so differentiable)."""
    stride, padding, output_padding, groups, dilation = geometry
    derivative = _activation_slope(x, w, b, geometry, activation, slope)
    # act'(z) * grad_y in at least fp32, rounded once to the gradient's dtype.
    grad_z = grad_y if derivative is None else (grad_y.to(derivative.dtype) * derivative).to(grad_y.dtype)
    unbatched = x.dim() == w.dim() - 1
    if unbatched:
        x, grad_z = x.unsqueeze(0), grad_z.unsqueeze(0)
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = dispatch.input_grad(grad_z, w, list(x.shape[2:]), stride, padding, dilation, groups)
        grad_x = grad_x.squeeze(0) if unbatched else grad_x
    if needs[1]:
        grad_w = dispatch.weight_grad(x, grad_z, list(w.shape[2:]), stride, padding, dilation, groups)
    if b is not None and needs[2]:  # (under compile the flags cover given tensors only)
        grad_b = grad_z.sum(dim=[0, *range(2, grad_z.dim())])
    return grad_x, grad_w, grad_b, grad_y if has_residual and needs[3] else None


class ConvTranspose(torch.autograd.Function):
    """``y = activation(T(x, w) + b) + residual`` (the op ``conv_transpose``'s arguments)."""

    @staticmethod
    def forward(x, w, b, stride, padding, output_padding, groups, dilation, activation, slope, residual):
        with tangents_carried():
            return ops.conv_transpose.default(x, w, b, stride, padding, output_padding, groups, dilation, activation,
                                              slope, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, output_padding, groups, dilation, activation, slope, residual = inputs
        ctx.save_for_backward(x, w, b)
        ctx.save_for_forward(x, w, b)
        ctx.geometry = (stride, padding, output_padding, groups, dilation)
        ctx.epilogue = (activation, slope)
        ctx.has_residual = residual is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, w, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with PACKED.trained():
            grad_x, grad_w, grad_b, grad_r = conv_transpose_gradients(
                x, w, b, grad_y, ctx.geometry, *ctx.epilogue, ctx.has_residual, (*needs[:3], needs[10]))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, grad_r

    @staticmethod
    def jvp(ctx, dx, dw, db, d_stride, d_padding, d_output_padding, d_groups, d_dilation, d_activation, d_slope, dr):
        x, w, b = ctx.saved_tensors
        geometry = ctx.geometry
        dz = None
        if dx is not None:
            dz = dispatch.conv_transpose(dx, w, None, geometry, None, 0.01, None)
        if dw is not None:
            dz = _add(dz, dispatch.conv_transpose(x, dw, None, geometry, None, 0.01, None))
        if db is not None:
            dz = _add(dz, db.reshape(-1, *(1,) * (w.dim() - 2)))
        if dz is None:
            dz = torch.zeros_like(dispatch.conv_transpose(x, w, b, geometry, None, 0.01, None))
        derivative = _activation_slope(x, w, b, geometry, *ctx.epilogue)
        if derivative is not None:
            dz = (dz.to(derivative.dtype) * derivative).to(dz.dtype)
        return _add(dz, dr)

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, output_padding, groups, dilation, activation, slope, residual):
        x_dim, w_dim, b_dim, *_, r_dim = in_dims
        geometry = (stride, padding, output_padding, groups, dilation)
        rank = w.dim() - 2
        if x_dim is not None and w_dim is None and b_dim is None:
            # Only the samples are batched: the vmapped axis joins the batch axis.
            unbatched = x.dim() == rank + 2  # each sample is [C, *spatial]
            fold = (lambda t, d: t.movedim(d, 0)) if unbatched else _fold_batch
            size = info.batch_size
            r = None if residual is None else fold(
                residual if r_dim is not None else residual.expand(size, *residual.shape),
                r_dim if r_dim is not None else 0)
            y = dispatch.conv_transpose(fold(x, x_dim), w, b, geometry, activation, slope, r)
            return (y if unbatched else y.reshape(size, -1, *y.shape[1:])), 0

        def one(x, w, b, residual):
            return dispatch.conv_transpose(x, w, b, geometry, activation, slope, residual)

        return _batched_by_loop(one, info, (x_dim, w_dim, b_dim, r_dim), x, w, b, residual)


class Recorded(torch.autograd.Function):
    """A forward of plain tensors, recorded (``dispatch`` records a call so where nothing
    but autograd would see it): by its class's prepared call ``ready``, or where there is
    none yet by a first call (which prepares one).  The forward keeps the weight as the
    kernels read it; without ``create_graph``, the backward runs the class's prepared
    gradients directly, the input gradient reading that weight as it is; with it (or
    with an activation to differentiate), the gradients go through the ops as
    ``ConvTranspose``'s do."""

    @staticmethod
    def forward(ctx, geometry, activation, slope, ready, x, w, b, residual):
        with PACKED.trained():
            if ready is None:
                out, read = first_forward(x, w, b, geometry, activation, slope, residual)
                ready = prepared_forward(x, w, b, geometry, activation, slope, residual)
            else:
                out, read = ready.with_weight(x, w, b, residual)
        ctx.prepared, ctx.geometry, ctx.epilogue = ready, geometry, (activation, slope)
        ctx.save_for_backward(x, w, b, read)
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x, w, b, read = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]  # (x, w, b, residual)
        prepared = ctx.prepared
        if (torch.is_grad_enabled() or prepared is None or ctx.epilogue[0] is not None
                or not dispatch.plain(grad_y, x, w)):
            ROUTES["ops"] += 1
            with PACKED.trained():
                return None, None, None, None, *conv_transpose_gradients(x, w, b, grad_y, ctx.geometry, *ctx.epilogue,
                                                                         ctx.has_residual, needs)
        ROUTES["prepared"] += 1
        g = prepared.checked.geometry
        unbatched = prepared.unbatched
        x_, grad_z = (x.unsqueeze(0), grad_y.unsqueeze(0)) if unbatched else (x, grad_y)
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = input_grad(grad_z, read, x_.shape[2:], g.stride, g.padding, g.dilation, g.groups, as_given=True)
            grad_x = grad_x.squeeze(0) if unbatched else grad_x
        bias = b is not None and needs[2]
        if needs[1]:  # (the bias's gradient from the same launch, and the weight's in its layout)
            grad_w, grad_b = weight_grad_of(x_, grad_z, w.shape[2:], g.stride, g.padding, g.dilation, g.groups,
                                            bias=bias, like=w)
        elif bias:
            grad_b = grad_z.sum(dim=[0, *range(2, grad_z.dim())])
        return None, None, None, None, grad_x, grad_w, grad_b, grad_y if ctx.has_residual and needs[3] else None


# Function.apply as it ends (record the call, run ``forward``), without its Python wrapper,
# whose work (binding default arguments, unwrapping functorch's dead wrappers) has nothing
# to do on plain tensors with no transform active.
record = torch._C._FunctionBase.__dict__["apply"].__get__(None, Recorded)


# --------------------------------------------------------------- I(gy, w) and W(x, gy)


def _backward_input_grad(ctx, g):
    needs = ctx.needs_input_grad
    grad_y, w = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_grad_y = d_w = None
    if needs[0]:
        d_grad_y = _T(g, w, grad_y.shape[2:], stride, padding, dilation, groups)
    if needs[1]:
        d_w = dispatch.weight_grad(g, grad_y, list(w.shape[2:]), stride, padding, dilation, groups)
    return d_grad_y, d_w, None, None, None, None, None


def _backward_weight_grad(ctx, g):
    needs = ctx.needs_input_grad
    x, grad_y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_x = d_grad_y = None
    if needs[0]:
        d_x = dispatch.input_grad(grad_y, g, list(x.shape[2:]), stride, padding, dilation, groups)
    if needs[1]:
        d_grad_y = _T(x, g, grad_y.shape[2:], stride, padding, dilation, groups)
    return d_x, d_grad_y, None, None, None, None, None


def _batched_by_loop(function, info, in_dims, *args):
    """A vmap rule: ``function`` on each slice of the batched arguments, stacked.  Used
    where folding the vmapped axis into the batch is not valid."""
    size = info.batch_size
    slices = [[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)] for i in range(size)]
    return torch.stack([function(*s) for s in slices]), 0


def _fold_batch(t, dim):
    """A tensor with vmapped axis ``dim``, that axis folded into its batch axis."""
    t = t.movedim(dim, 0)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _bilinear_jvp(gradient_op, ctx, d_a, d_b):
    """The tangent of a bilinear gradient op ``f(a, b)``: ``f(da, b) + f(a, db)``."""
    a, b = ctx.saved_tensors
    out = None
    if d_a is not None:
        out = gradient_op(d_a, b, ctx.size, *ctx.geometry)
    if d_b is not None:
        out = _add(out, gradient_op(a, d_b, ctx.size, *ctx.geometry))
    return out


def _input_grad_vmap(info, in_dims, grad_y, w, input_size, stride, padding, dilation, groups):
    if in_dims[0] is not None and in_dims[1] is None:  # per-sample gradients: fold into the batch
        out = dispatch.input_grad(_fold_batch(grad_y, in_dims[0]), w, input_size, stride, padding, dilation, groups)
        return out.reshape(info.batch_size, -1, *out.shape[1:]), 0
    return _batched_by_loop(lambda gy, w: dispatch.input_grad(gy, w, input_size, stride, padding, dilation, groups),
                            info, in_dims[:2], grad_y, w)


def _weight_grad_vmap(info, in_dims, x, grad_y, kernel_size, stride, padding, dilation, groups):
    # The weight gradient sums over the batch, so a vmapped axis cannot join it.
    return _batched_by_loop(lambda x, gy: dispatch.weight_grad(x, gy, kernel_size, stride, padding, dilation, groups),
                            info, in_dims[:2], x, grad_y)


def _gradient_function(name: str, op, transform_aware, backward, vmap) -> type:
    """The ``torch.autograd.Function`` of gradient op ``op`` (``(a, b, size, stride,
    padding, dilation, groups)``): its ``backward``, the bilinear tangent, and ``vmap``."""

    def forward(a, b, size, stride, padding, dilation, groups):
        with tangents_carried():
            return op(a, b, size, stride, padding, dilation, groups)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.size = inputs[2]
        ctx.geometry = tuple(inputs[3:])

    def backward_(ctx, g):
        with PACKED.trained():
            return backward(ctx, g)

    def jvp(ctx, d_a, d_b, *_):
        return _bilinear_jvp(transform_aware, ctx, d_a, d_b)

    methods = dict(forward=forward, setup_context=setup_context, backward=backward_, jvp=jvp, vmap=vmap)
    return type(name, (torch.autograd.Function,), {k: staticmethod(f) for k, f in methods.items()})


InputGrad = _gradient_function("InputGrad", ops.conv_transpose_input_grad.default, dispatch.input_grad,
                               _backward_input_grad, _input_grad_vmap)
InputGrad.__doc__ = "``I(gy, w)``, the input gradient (see the module docstring)."
WeightGrad = _gradient_function("WeightGrad", ops.conv_transpose_weight_grad.default, dispatch.weight_grad,
                                _backward_weight_grad, _weight_grad_vmap)
WeightGrad.__doc__ = "``W(x, gy)``, the weight gradient (see the module docstring)."

# Each op's Function, by op.
FUNCTIONS = {ops.conv_transpose.default: ConvTranspose, ops.conv_transpose_input_grad.default: InputGrad,
             ops.conv_transpose_weight_grad.default: WeightGrad}
