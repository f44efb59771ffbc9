"""Autograd for the ops, written in terms of the ops themselves so that every
gradient is differentiable again (double backward, gradgradcheck).

For ``y = T(x, w)`` (transposed convolution; stride s, padding p, dilation d, groups g):

    grad_x = I(grad_y, w)        conv_transpose_input_grad: the strided convolution
    grad_w = W(x, grad_y)        conv_transpose_weight_grad: taps as GEMM columns
    grad_b = Σ_{n, spatial} grad_y

``I`` and ``W`` are bilinear, and their own gradients close the set:

    I(gy, w):  d gy = T(g, w),    d w = W(g, gy)
    W(x, gy):  d x  = I(gy, g),   d gy = T(x, g)

where ``g`` is the incoming gradient; ``T`` gets the output_padding that reproduces
``gy``'s size.  Only the gradients that are needed are computed.

Two registrations of the same formulas:

* on the ops (an autograd kernel each, below): what ``backward()``, double backward
  and ``torch.compile`` use;
* as ``torch.autograd.Function``s with ``setup_context``, ``jvp`` and ``vmap``
  (``TransposedConv``, ``InputGrad``, ``WeightGrad``): what the public functions use
  while a ``torch.func`` transform (``grad``, ``jacrev``, ``hessian``, ``jvp``,
  ``vmap``, ...) or forward-mode AD is active, since PyTorch runs those transforms
  only through such Functions.  Being bilinear, each op's tangent is the op applied to
  the tangents: ``dT = T(dx, w) + T(x, dw)`` (plus the bias's), and so on.
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as forward_ad

from .kernels.activations import TABLE as ACTIVATION_TABLE
from .ops import IMPLEMENTATIONS, LIBRARY, tangents_carried, transposed_output_padding
from .weights import PACKED

ops = torch.ops.tritondeconv

# The one forward op's arguments, in order: its backward returns one gradient per name.
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation", "activation",
              "negative_slope", "residual")


_SLOT = {name: i for i, name in enumerate(_ARGUMENTS)}


def _per_argument(**gradients) -> tuple:
    """The gradients named, ``None`` for every other argument of the op, in its order."""
    slots = [None] * len(_ARGUMENTS)
    for name, gradient in gradients.items():
        slots[_SLOT[name]] = gradient
    return tuple(slots)


def _T(x, w, grad_y_size, stride, padding, dilation, groups):
    """T(x, w) sized like ``grad_y_size``."""
    output_padding = transposed_output_padding(x.shape[2:], grad_y_size, w.shape[2:], stride, padding, dilation)
    return transposed_conv(x, w, None, stride, padding, output_padding, groups, dilation)


# --------------------------------------------------------------- the ops' autograd kernels
# What ``torch.library.register_autograd`` registers, without its per-call argument
# normalisation (about 20 µs a call, most of a small layer's host time): a call that
# records no graph goes straight below autograd; one that does runs a
# ``torch.autograd.Function`` that calls the op below autograd and keeps what its
# backward needs (``setup``).  Below autograd, a call on plain CPU or CUDA tensors (no
# subclass, no mode, no functionalisation: nothing between autograd and the backend)
# calls the op's implementation directly, which is where the dispatcher would send it,
# sparing a second trip through it; and without excluding the autograd keys around it,
# since nothing there can record (grad mode is off, or no argument requires grad) and
# every ATen call made under a non-default key set leaves the dispatcher's fast path
# (about 0.5 µs each, several µs per call of ours).

# Dispatch key sets are handled in their raw form (an int: cheaper than the sets'
# operators), on which ``a & b`` is the sets' intersection and ``a - b`` is
# ``a & (_BACKEND_BITS | ~b)``: subtracting a set leaves a set's backend bits in place.


def _key_set(*keys: str) -> int:
    """The raw form of the dispatch key set of these key names."""
    return functools.reduce(lambda a, b: a | b, (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, k))
                                                 for k in keys)).raw_repr()


_BACKEND_BITS = (torch._C._dispatch_keyset_full() - torch._C._dispatch_keyset_full()).raw_repr()
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset.raw_repr()
# Keys that fall through for our ops (no kernel of their own; the dispatcher skips them).
_NOT_FALLTHROUGH = _BACKEND_BITS | ~_key_set("ADInplaceOrView", "BackendSelect")
_BACKENDS = frozenset(_key_set(k) for k in ("CPU", "CUDA"))


def _below_autograd(op, keys: int, args):
    """``op(*args)`` as the dispatcher runs it below autograd (``keys``: the call's
    dispatch key set, raw)."""
    below = keys & _AFTER_AUTOGRAD & _NOT_FALLTHROUGH
    if below in _BACKENDS:
        return IMPLEMENTATIONS[op](*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(torch._C.DispatchKeySet.from_raw_repr(below), *args)


def _autograd_function(name: str, op, setup, backward) -> type:
    """The ``torch.autograd.Function`` that records ``op`` for ``backward(ctx, grad,
    needs)`` (``needs``: which of the op's arguments want a gradient)."""

    def forward(ctx, keys, *args):
        with PACKED.trained():
            out = _below_autograd(op, keys, args)
        setup(ctx, args, out)
        return out

    def backward_(ctx, grad):
        with PACKED.trained():
            return None, *backward(ctx, grad, ctx.needs_input_grad[1:])

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward_)})


def _autograd_kernel(function: type, op, keyset, *args):
    """The autograd kernel of ``op``: ``op(*args)``, recorded by ``function`` when a
    gradient is wanted."""
    keys = keyset.raw_repr()
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(keys, *args)
    return _below_autograd(op, keys, args)


# --------------------------------------------------------------- conv_transpose
# y = act(T(x, w) + b) + r:  grad_r = gy, and T's gradients of gz = gy * act'(z) with
# z = T(x, w) + b recomputed (one more forward, instead of keeping z in memory).


def setup_conv_transpose(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation, activation, slope, residual = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.has_bias = bias is not None
    ctx.geometry = (stride, padding, dilation)  # (tuples, or lists the dispatcher made for this call)
    ctx.groups = groups
    ctx.epilogue = (stride, padding, output_padding, groups, dilation, activation, slope)
    ctx.has_residual = residual is not None


def _grads(ctx, x, w, grad_y, needs):
    """grad_input, grad_weight, grad_bias of T, each only if ``needs`` it (the flags of
    (input, weight, bias))."""
    stride, padding, dilation = ctx.geometry
    unbatched = x.dim() == w.dim() - 1
    if unbatched:
        x, grad_y = x.unsqueeze(0), grad_y.unsqueeze(0)
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = _input_grad(grad_y, w, list(x.shape[2:]), stride, padding, dilation, ctx.groups)
        grad_x = grad_x.squeeze(0) if unbatched else grad_x
    if needs[1]:
        grad_w = _weight_grad(x, grad_y, list(w.shape[2:]), stride, padding, dilation, ctx.groups)
    if ctx.has_bias and needs[2]:  # (under compile the flags cover given tensors only)
        grad_b = grad_y.sum(dim=[0, *range(2, grad_y.dim())])
    return grad_x, grad_w, grad_b


def _activation_slope(ctx, x, w, b):
    """act'(z) at z = T(x, w) + b, in at least fp32, or None without an activation."""
    stride, padding, output_padding, groups, dilation, activation, slope = ctx.epilogue
    if activation is None:
        return None
    z = transposed_conv(x, w, b, stride, padding, output_padding, groups, dilation)
    return ACTIVATION_TABLE[activation].derivative(z.to(torch.promote_types(z.dtype, torch.float32)), slope)


def backward_conv_transpose(ctx, grad_y, needs=None):
    """The gradients of every argument (``needs``: the flags of the op's arguments;
    default ``ctx.needs_input_grad``)."""
    needs = ctx.needs_input_grad if needs is None else needs
    x, w, b = ctx.saved_tensors
    derivative = _activation_slope(ctx, x, w, b)
    # act'(z) * grad_y in at least fp32, rounded once to the gradient's dtype.
    grad_z = grad_y if derivative is None else (grad_y.to(derivative.dtype) * derivative).to(grad_y.dtype)
    grad_x, grad_w, grad_b = _grads(ctx, x, w, grad_z, needs[:3])
    grad_r = grad_y if ctx.has_residual and needs[10] else None
    return _per_argument(input=grad_x, weight=grad_w, bias=grad_b, residual=grad_r)


_ConvTranspose = _autograd_function("_ConvTranspose", ops.conv_transpose.default, setup_conv_transpose,
                                    backward_conv_transpose)


def _conv_transpose_autograd(keyset, input, weight, bias, stride, padding, output_padding, groups, dilation,
                             activation=None, negative_slope=0.01, residual=None):
    """The op's autograd kernel (the op hands a Python kernel its trailing arguments only
    where they differ from their defaults)."""
    return _autograd_kernel(_ConvTranspose, ops.conv_transpose.default, keyset, input, weight, bias, stride, padding,
                            output_padding, groups, dilation, activation, negative_slope, residual)


LIBRARY.impl("conv_transpose", _conv_transpose_autograd, "Autograd", with_keyset=True)
_FUNCTIONS = {ops.conv_transpose.default: _ConvTranspose}  # each op's recording Function, by op


# --------------------------------------------------------------- I(gy, w) and W(x, gy)


def _setup_gradient_op(ctx, inputs, output):
    """Both gradient ops take (tensor, tensor, size, stride, padding, dilation, groups)."""
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.geometry = tuple(inputs[3:])


def _backward_input_grad(ctx, g, needs=None):
    needs = ctx.needs_input_grad if needs is None else needs
    grad_y, w = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_grad_y = d_w = None
    if needs[0]:
        d_grad_y = _T(g, w, grad_y.shape[2:], stride, padding, dilation, groups)
    if needs[1]:
        d_w = _weight_grad(g, grad_y, list(w.shape[2:]), stride, padding, dilation, groups)
    return d_grad_y, d_w, None, None, None, None, None


def _backward_weight_grad(ctx, g, needs=None):
    needs = ctx.needs_input_grad if needs is None else needs
    x, grad_y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    d_x = d_grad_y = None
    if needs[0]:
        d_x = _input_grad(grad_y, g, list(x.shape[2:]), stride, padding, dilation, groups)
    if needs[1]:
        d_grad_y = _T(x, g, grad_y.shape[2:], stride, padding, dilation, groups)
    return d_x, d_grad_y, None, None, None, None, None


for _name, _backward in (("conv_transpose_input_grad", _backward_input_grad),
                         ("conv_transpose_weight_grad", _backward_weight_grad)):
    _op = getattr(ops, _name).default
    _FUNCTIONS[_op] = _autograd_function(f"_{_name}", _op, _setup_gradient_op, _backward)
    LIBRARY.impl(_name, functools.partial(_autograd_kernel, _FUNCTIONS[_op], _op), "Autograd", with_keyset=True)

# Each op's Function's ``apply`` as ``Function.apply`` ends in (record the call, run
# ``forward``), for ``_call``.
_RECORD = {op: torch._C._FunctionBase.__dict__["apply"].__get__(None, function) for op, function in _FUNCTIONS.items()}


# --------------------------------------------------------------- function transforms


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode AD level surrounds this call
    (then the Functions below must carry it; otherwise the ops do, more cheaply).
    Never while ``torch.compile`` traces: it traces the ops, with their registered
    autograd (Dynamo does not trace Functions that define ``jvp``)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def transposed_conv(x, w, b, stride, padding, output_padding, groups, dilation, activation=None, slope=0.01,
                    residual=None):
    """``activation(T(x, w) + b) + residual`` (arguments parsed, one entry per spatial
    axis) through the op, or through ``TransposedConv`` under a function transform."""
    return _call(ops.conv_transpose.default, (x, w, b, residual), x, w, b, stride, padding, output_padding, groups,
                 dilation, activation, slope, residual)


def _input_grad(grad_y, w, input_size, stride, padding, dilation, groups):
    return _call(ops.conv_transpose_input_grad.default, (grad_y, w), grad_y, w, input_size, stride, padding, dilation,
                 groups)


def _weight_grad(x, grad_y, kernel_size, stride, padding, dilation, groups):
    return _call(ops.conv_transpose_weight_grad.default, (x, grad_y), x, grad_y, kernel_size, stride, padding, dilation,
                 groups)


# The dispatch key sets of a call on plain tensors with nothing active around it but
# (perhaps) no_grad or inference_mode, and whether autograd is among them: the
# dispatcher then runs the op's autograd kernel, or where autograd is excluded (inference
# mode) the implementation, and nothing else.  There a normal tensor keeps its
# ADInplaceOrView key (a fallthrough for our ops); an inference tensor has none.
_PLAIN_CALLS = {_key_set(*keys): autograd for device in ("CPU", "CUDA")
                for keys, autograd in (((device, "BackendSelect", "ADInplaceOrView", f"Autograd{device}"), True),
                                       ((device, "BackendSelect", "ADInplaceOrView"), False),
                                       ((device, "BackendSelect"), False))}


def _call(op, tensors: tuple, *args):
    """``op(*args)`` (``tensors``: its tensor arguments, None for an absent optional
    one), or under a function transform the same through the op's transform-aware
    Function (``transforms_active``).  Where the dispatcher would run nothing but the
    op's autograd kernel (plain CPU or CUDA tensors; no ``__torch_function__``, mode,
    autocast, tracing, fake tensor or compilation), that kernel's work is done here: the
    op recorded by its Function where a gradient is wanted, otherwise its
    implementation, which is where the plain key set sends it (as ``_below_autograd``
    calls it).  The same computation, without a trip through the dispatcher."""
    if transforms_active():
        return _TRANSFORM_AWARE[op].apply(*args)
    if not torch.compiler.is_compiling() and not torch._C._has_torch_function(tensors):
        keys = torch._C._dispatch_tls_local_include_set().raw_repr()
        for t in tensors:
            if t is not None:
                keys |= torch._C._dispatch_keys(t).raw_repr()
        keys &= _BACKEND_BITS | ~torch._C._dispatch_tls_local_exclude_set().raw_repr()
        autograd = _PLAIN_CALLS.get(keys)
        if autograd is not None:
            if autograd and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
                # ``Function.apply`` without its Python wrapper, whose work (binding
                # default arguments, unwrapping functorch's dead wrappers) has nothing to
                # do on plain tensors with no transform active.
                return _RECORD[op](keys, *args)
            return IMPLEMENTATIONS[op](*args)
    return op(*args)


def _add(a, b):
    """``a + b`` where either may be None (a missing tangent)."""
    return b if a is None else a if b is None else a + b


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


class TransposedConv(torch.autograd.Function):
    """``y = activation(T(x, w) + b) + residual`` (see the module docstring)."""

    @staticmethod
    def forward(x, w, b, stride, padding, output_padding, groups, dilation, activation, slope, residual):
        with tangents_carried():
            return ops.conv_transpose.default(x, w, b, stride, padding, output_padding, groups, dilation, activation,
                                              slope, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        setup_conv_transpose(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])

    @staticmethod
    def backward(ctx, grad_y):
        return backward_conv_transpose(ctx, grad_y)

    @staticmethod
    def jvp(ctx, dx, dw, db, d_stride, d_padding, d_output_padding, d_groups, d_dilation, d_activation, d_slope, dr):
        x, w, b = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation, activation, slope = ctx.epilogue
        geometry = (stride, padding, output_padding, groups, dilation)
        dz = None
        if dx is not None:
            dz = transposed_conv(dx, w, None, *geometry)
        if dw is not None:
            dz = _add(dz, transposed_conv(x, dw, None, *geometry))
        if db is not None:
            dz = _add(dz, db.reshape(-1, *(1,) * (w.dim() - 2)))
        if dz is None:
            dz = torch.zeros_like(transposed_conv(x, w, b, *geometry))
        derivative = _activation_slope(ctx, x, w, b)
        if derivative is not None:
            dz = (dz.to(derivative.dtype) * derivative).to(dz.dtype)
        return _add(dz, dr)

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, output_padding, groups, dilation, activation, slope, residual):
        x_dim, w_dim, b_dim, *_, r_dim = in_dims
        rank = w.dim() - 2
        if x_dim is not None and w_dim is None and b_dim is None:
            # Only the samples are batched: the vmapped axis joins the batch axis.
            unbatched = x.dim() == rank + 2  # each sample is [C, *spatial]
            fold = (lambda t, d: t.movedim(d, 0)) if unbatched else _fold_batch
            size = info.batch_size
            r = None if residual is None else fold(residual if r_dim is not None else residual.expand(size, *residual.shape),
                                                    r_dim if r_dim is not None else 0)
            y = transposed_conv(fold(x, x_dim), w, b, stride, padding, output_padding, groups, dilation, activation,
                                slope, r)
            return (y if unbatched else y.reshape(size, -1, *y.shape[1:])), 0

        def one(x, w, b, residual):
            return transposed_conv(x, w, b, stride, padding, output_padding, groups, dilation, activation, slope,
                                   residual)

        return _batched_by_loop(one, info, (x_dim, w_dim, b_dim, r_dim), x, w, b, residual)


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
        out = _input_grad(_fold_batch(grad_y, in_dims[0]), w, input_size, stride, padding, dilation, groups)
        return out.reshape(info.batch_size, -1, *out.shape[1:]), 0
    return _batched_by_loop(lambda gy, w: _input_grad(gy, w, input_size, stride, padding, dilation, groups),
                            info, in_dims[:2], grad_y, w)


def _weight_grad_vmap(info, in_dims, x, grad_y, kernel_size, stride, padding, dilation, groups):
    # The weight gradient sums over the batch, so a vmapped axis cannot join it.
    return _batched_by_loop(lambda x, gy: _weight_grad(x, gy, kernel_size, stride, padding, dilation, groups),
                            info, in_dims[:2], x, grad_y)


def _gradient_function(name: str, op, transform_aware, backward, vmap) -> type:
    """The ``torch.autograd.Function`` of gradient op ``op`` (``(a, b, size, stride,
    padding, dilation, groups)``): the op's registered ``backward``, the bilinear
    tangent, and ``vmap``."""

    def forward(a, b, size, stride, padding, dilation, groups):
        with tangents_carried():
            return op(a, b, size, stride, padding, dilation, groups)

    def setup_context(ctx, inputs, output):
        _setup_gradient_op(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.size = inputs[2]

    def jvp(ctx, d_a, d_b, *_):
        return _bilinear_jvp(transform_aware, ctx, d_a, d_b)

    methods = dict(forward=forward, setup_context=setup_context, backward=backward, jvp=jvp, vmap=vmap)
    return type(name, (torch.autograd.Function,), {k: staticmethod(f) for k, f in methods.items()})


InputGrad = _gradient_function("InputGrad", ops.conv_transpose_input_grad, _input_grad, _backward_input_grad,
                               _input_grad_vmap)
InputGrad.__doc__ = "``I(gy, w)``, the input gradient (see the module docstring)."
WeightGrad = _gradient_function("WeightGrad", ops.conv_transpose_weight_grad, _weight_grad, _backward_weight_grad,
                                _weight_grad_vmap)
WeightGrad.__doc__ = "``W(x, gy)``, the weight gradient (see the module docstring)."

# Each op's transform-aware Function (taking the op's arguments), for ``_call``.
_TRANSFORM_AWARE = {ops.conv_transpose.default: TransposedConv, ops.conv_transpose_input_grad.default: InputGrad,
                    ops.conv_transpose_weight_grad.default: WeightGrad}
