"""How the public functions reach the ops: through PyTorch's dispatcher, or on plain
tensors straight to what the dispatcher would run.

A call of the ops through the dispatcher costs its trip through every dispatch key and
our autograd kernel's Python.  Where nothing but autograd and the backend kernel would
see the call, the public functions do their work directly: on *plain* tensors
(``plain``: exactly ``torch.Tensor`` or ``nn.Parameter``, on CPU or CUDA, with no
torch-function mode, no dispatch mode, autocast, tracer, functorch layer or anything
else in the thread's dispatch state but what every eager call has, or what
``torch.inference_mode`` adds), a forward call runs its class's prepared call
(``prepared.Forward``), recorded by ``gradients.Recorded`` where autograd must record
it, and a gradient call runs the op's implementation, or its ``Function`` where it must
be recorded.  Anything else (a mode, a subclass, autocast, ``torch.compile`` tracing,
a ``torch.func`` transform or forward-mode AD) goes through the op (or, for the
transforms, through the op's transform-aware ``Function``): the same computation, seen
by whatever watches.
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as forward_ad

from . import prepared
from .arguments import overlaps_itself, shares_elements
from .kernels.common import EPOCH

ops = torch.ops.tritondeconv
Tensor, Parameter = torch.Tensor, torch.nn.Parameter

# Each op's ``torch.autograd.Function`` and the short way's recording Function's apply,
# registered by ``gradients`` (which builds them on the functions here).
FUNCTIONS: dict = {}
RECORD: list = []


def _key_set(*names: str) -> torch._C.DispatchKeySet:
    return functools.reduce(lambda a, b: a | b, (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, name))
                                                 for name in names))


# The thread's dispatch state of a plain eager call, and of one under torch.inference_mode
# (autograd excluded): the keys every call includes, and the keys it excludes (each
# device's autocast key while autocast is off; those of the devices this build names
# are added, in case the package is imported inside an autocast region).
_INCLUDED = _key_set("BackendSelect", "ADInplaceOrView")
_INFERENCE_INCLUDED = _key_set("BackendSelect")
_AUTOCAST = _key_set(*(name for name in torch._C.DispatchKey.__members__ if name.startswith("Autocast")))
with torch.inference_mode(False):
    _EXCLUDED = torch._C._dispatch_tls_local_exclude_set() | _AUTOCAST
with torch.inference_mode():
    _INFERENCE_EXCLUDED = torch._C._dispatch_tls_local_exclude_set() | _AUTOCAST
_include, _exclude = torch._C._dispatch_tls_local_include_set, torch._C._dispatch_tls_local_exclude_set
_function_mode = torch._C._is_torch_function_mode_enabled


def _tls() -> int:
    """The thread's dispatch state: 1 for a plain eager call's, 2 for one under
    ``torch.inference_mode``, 0 for anything else."""
    included, excluded = _include(), _exclude()
    if included == _INCLUDED and excluded == _EXCLUDED:
        return 1
    if included == _INFERENCE_INCLUDED and excluded == _INFERENCE_EXCLUDED:
        return 2
    return 0


def plain(*tensors) -> bool:
    """Whether a call on ``tensors`` (``None`` for an absent one) reaches nothing but
    autograd and the backend kernel (see the module docstring)."""
    if torch.compiler.is_compiling() or _function_mode() or forward_ad._current_level >= 0 or not _tls():
        return False
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not Parameter) or t.is_sparse):
            return False
    return True


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode AD level surrounds this call
    (then the ops' Functions must carry it).  Never while ``torch.compile`` traces: it
    traces the ops, with their registered autograd."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


# ---------------------------------------------------------------- the forward


def conv_transpose(x, w, b, geometry: tuple, activation, slope: float, residual) -> torch.Tensor:
    """``activation(T(x, w) + b) + residual`` (``geometry``: the op's five integer
    arguments, one entry per spatial axis, hashable), the short way where the call is
    plain (see the module docstring), through the op otherwise."""
    if (not torch.compiler.is_compiling() and not _function_mode() and forward_ad._current_level < 0
            and type(x) is Tensor and (type(w) is Parameter or type(w) is Tensor)):
        state = _tls()
        if state:
            ready = prepared.prepared_forward(x, w, b, geometry, activation, slope, residual)
            if (state == 1 and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (
                    b is not None and b.requires_grad) or (residual is not None and residual.requires_grad))):
                if plain(b, residual):
                    return RECORD[0](geometry, activation, slope, ready, x, w, b, residual)
                return FUNCTIONS[ops.conv_transpose.default].apply(x, w, b, *geometry, activation, slope, residual)
            if ready is not None:
                return ready(x, w, b, residual)
            if plain(b, residual):
                return prepared.first_forward(x, w, b, geometry, activation, slope, residual)[0]
    if transforms_active():
        return FUNCTIONS[ops.conv_transpose.default].apply(x, w, b, *geometry, activation, slope, residual)
    return ops.conv_transpose.default(x, w, b, *geometry, activation, slope, residual)


def conv_transpose_into(out: torch.Tensor, x, w, b, geometry: tuple, activation, slope: float,
                        residual) -> torch.Tensor:
    """The forward (arguments parsed: ``geometry`` one entry per spatial axis) written into
    ``out``, any strides (a slice of a larger tensor among them), by PyTorch's ``out=``
    rules: ``out`` has the output's shape (a tensor with no elements is resized to it)
    and the input's dtype and device, no two of its elements share memory, and autograd
    cannot record it (an error where it would have to).  Where ``out`` shares elements
    with an argument, the result is computed apart and then copied, as aten does; a slice
    of the same buffer sharing none (a concatenation's part) is written directly.
    Returns ``out``."""
    checked, unbatched, name = prepared.check_forward(x, w, b, *geometry, activation, residual)
    arguments = {"input": x, "weight": w, "bias": b, "residual": residual}
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, *arguments.values())):
        raise RuntimeError(f"{name}(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad")
    shape = checked.output_shape[unbatched:]
    if out.numel() == 0 and tuple(out.shape) != shape:
        out.resize_(shape)
    if tuple(out.shape) != shape:
        raise RuntimeError(f"{name}: expected out to have the output's size {list(shape)}, but got {list(out.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise RuntimeError(f"{name}: expected out to have the input's dtype {x.dtype} and device "
                           f"{x.device}, but got {out.dtype} on {out.device}")
    if overlaps_itself(out):
        raise RuntimeError(f"{name}: unsupported operation: more than one element of out refers to a single "
                           "memory location; clone() it before passing it as out")
    if out.numel() == 0:
        return out
    if not plain(x, w, b, residual, out) or any(t is not None and shares_elements(out, t)
                                                for t in arguments.values()):
        # Through the op into a new output, then copied (as aten's out= computes).
        return out.copy_(conv_transpose(x, w, b, geometry, activation, slope, residual))
    batched = out.unsqueeze(0) if unbatched else out
    key = ("into", batched.stride(), prepared.forward_key(x, w, b, geometry, activation, slope, residual))
    ready = prepared.INTO.get(key)
    if ready is not None and ready.epoch == EPOCH[0]:
        ready.into(batched, x, w, b, residual)
    else:
        prepared.first_forward(x, w, b, geometry, activation, slope, residual, out=batched, into_key=key)
    return out


# ---------------------------------------------------------------- the gradient ops


def _call(op, tensors: tuple, *args):
    """``op(*args)`` (``tensors``: its tensor arguments), the short way where the call is
    plain: its ``Function`` where a gradient is wanted, its implementation otherwise."""
    if plain(*tensors):
        if torch.is_grad_enabled() and _tls() == 1 and any(t.requires_grad for t in tensors):
            return FUNCTIONS[op].apply(*args)
        return IMPLEMENTATIONS[op](*args)
    if transforms_active():
        return FUNCTIONS[op].apply(*args)
    return op(*args)


def input_grad(grad_y, w, input_size, stride, padding, dilation, groups):
    """``conv_transpose_input_grad`` (see ``gradients``)."""
    return _call(ops.conv_transpose_input_grad.default, (grad_y, w), grad_y, w, input_size, stride, padding, dilation,
                 groups)


def weight_grad(x, grad_y, kernel_size, stride, padding, dilation, groups):
    """``conv_transpose_weight_grad`` (see ``gradients``)."""
    return _call(ops.conv_transpose_weight_grad.default, (x, grad_y), x, grad_y, kernel_size, stride, padding, dilation,
                 groups)


# Each op's implementation (what the dispatcher runs at the backend), registered by
# ``registrations``.
IMPLEMENTATIONS: dict = {}
