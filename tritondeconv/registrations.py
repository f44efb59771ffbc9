"""The ``torch.ops.tritondeconv`` ops: their schemas, and what runs at each dispatch key.

  ``conv_transpose``          every transposed convolution, any spatial rank (the length
                              of ``stride``), with the optional epilogue (activation,
                              residual): the one implementation
  ``conv_transpose1d``, ``conv_transpose2d``, ``conv_transpose3d``
                              aten's signatures, thin registrations over ``conv_transpose``
  ``conv_transpose2d_fused``  the same with the epilogue (the 2-D name earlier versions had)
  ``conv_transpose_input_grad``, ``conv_transpose_weight_grad``
                              the gradients (rank-generic, differentiable themselves:
                              ``gradients``)
  (``naive_conv_transpose2d``, the zero-insertion baseline, registers in ``baselines``.)

Per op: the implementation at the backend keys (``prepared``: where the work runs,
``backends``), a fake implementation (meta tensors, ``torch.compile``, which traces
the ops as opaque nodes, so each shape keeps its own tuning; ``docs/design.md`` says
why not a ``triton_op``), an autograd kernel (its ``gradients.Function``), autocast
for the forward ops as aten's convolutions have it, and a FLOP formula.  Defined
through ``torch.library.Library`` rather than ``custom_op``: the same registrations,
for a few microseconds less per call.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch.utils import flop_counter

LIBRARY = torch.library.Library("tritondeconv", "DEF")
ops = torch.ops.tritondeconv

LIBRARY.define(
    "conv_transpose(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] output_padding, "
    "int groups, int[] dilation, str? activation=None, float negative_slope=0.01, Tensor? residual=None) -> Tensor")
for _rank in (1, 2, 3):
    LIBRARY.define(
        f"conv_transpose{_rank}d(Tensor input, Tensor weight, Tensor? bias=None, int[{_rank}] stride=1, "
        f"int[{_rank}] padding=0, int[{_rank}] output_padding=0, int groups=1, int[{_rank}] dilation=1) -> Tensor")
LIBRARY.define(
    "conv_transpose2d_fused(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] output_padding, int groups, int[2] dilation, str? activation, float negative_slope, Tensor? residual) "
    "-> Tensor")
LIBRARY.define("conv_transpose_input_grad(Tensor grad_output, Tensor weight, int[] input_size, int[] stride, "
               "int[] padding, int[] dilation, int groups) -> Tensor")
LIBRARY.define("conv_transpose_weight_grad(Tensor input, Tensor grad_output, int[] kernel_size, int[] stride, "
               "int[] padding, int[] dilation, int groups) -> Tensor")

# (After the schemas: the gradients' Functions name the ops.)
from . import dispatch, gradients, prepared  # noqa: E402
from .layout import empty_in_format, output_memory_format  # noqa: E402


def _refuse_forward_ad(op: str, *tensors) -> None:
    """A clear error instead of a silently dropped tangent.  An op's autograd kernel
    records backward-only where no input requires grad: forward-mode AD
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) must come through the public
    functions, whose Functions carry it.  Called directly inside a forward-AD level, the
    op cannot tell whether ``torch.func.jvp`` unwrapped a tangent away, so it refuses."""
    if forward_ad._current_level < 0 or gradients.tangents_carried().depth:
        return
    if torch._C._is_fwd_grad_enabled() or any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"torch.ops.tritondeconv.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
            "is not supported on the op itself; "
            f"call tritondeconv.{op.removesuffix('_fused')} (or the nn modules), which support it")


# ---------------------------------------------------------------- implementations


def _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation=None,
                    negative_slope=0.01, residual=None):
    _refuse_forward_ad("conv_transpose", input, weight, bias, residual)
    return prepared.conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                                   negative_slope, residual)


def _input_grad(grad_output, weight, input_size, stride, padding, dilation, groups):
    _refuse_forward_ad("conv_transpose_input_grad", grad_output, weight)
    return prepared.input_grad(grad_output, weight, input_size, stride, padding, dilation, groups)


def _weight_grad(input, grad_output, kernel_size, stride, padding, dilation, groups):
    _refuse_forward_ad("conv_transpose_weight_grad", input, grad_output)
    return prepared.weight_grad_of(input, grad_output, kernel_size, stride, padding, dilation, groups)[0]


def _conv_transpose_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, activation=None,
                         negative_slope=0.01, residual=None):
    checked, unbatched, _ = prepared.check_forward(input, weight, bias, stride, padding, output_padding, groups,
                                                   dilation, activation, residual)
    out = input.new_empty_strided(checked.output_shape, checked.output_strides)
    return out.squeeze(0) if unbatched else out


def _input_grad_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    shape = (grad_output.shape[0], weight.shape[0], *input_size)
    return empty_in_format(shape, grad_output, output_memory_format(grad_output, weight))


def _weight_grad_fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
    return input.new_empty((input.shape[1], grad_output.shape[1] // groups, *kernel_size))


def _with_aten_signature(rank: int):
    """A forward op with aten's signature (and the 2-D one with the epilogue), over
    ``conv_transpose`` (a Python kernel receives only the arguments that differ from the
    schema's defaults)."""
    def op(input, weight, bias=None, stride=(1,) * rank, padding=(0,) * rank, output_padding=(0,) * rank, groups=1,
           dilation=(1,) * rank, activation=None, negative_slope=0.01, residual=None):
        return ops.conv_transpose.default(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                          activation, negative_slope, residual)
    return op


for _name, _implementation, _fake in (("conv_transpose", _conv_transpose, _conv_transpose_fake),
                                      ("conv_transpose_input_grad", _input_grad, _input_grad_fake),
                                      ("conv_transpose_weight_grad", _weight_grad, _weight_grad_fake)):
    LIBRARY.impl(_name, _implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tritondeconv::{_name}", _fake, lib=LIBRARY)
    dispatch.IMPLEMENTATIONS[getattr(ops, _name).default] = _implementation
for _rank in (1, 2, 3):
    LIBRARY.impl(f"conv_transpose{_rank}d", _with_aten_signature(_rank), "CompositeImplicitAutograd")
LIBRARY.impl("conv_transpose2d_fused", _with_aten_signature(2), "CompositeImplicitAutograd")


# ---------------------------------------------------------------- autograd


def _autograd_kernel(op, function: type, arity: int):
    """The autograd kernel of ``op``: ``op(*args)`` recorded by ``function`` where a
    gradient is wanted, below autograd otherwise (the defaults of trailing arguments
    filled in: the op hands a Python kernel only those that differ from them)."""
    defaults = tuple(argument.default_value for argument in op._schema.arguments)

    def kernel(*args):
        args = (*args, *defaults[len(args):arity])
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return kernel


for _op, _function in gradients.FUNCTIONS.items():
    LIBRARY.impl(_op._schema.name.split("::")[1], _autograd_kernel(_op, _function, len(_op._schema.arguments)),
                 "Autograd")
dispatch.FUNCTIONS.update(gradients.FUNCTIONS)
dispatch.RECORD.append(gradients.record)


# ---------------------------------------------------------------- autocast
# Under torch.autocast the forward ops behave as aten's convolutions do: their
# floating-point tensors on the autocast device, float64 excepted, are cast to the
# autocast dtype of the region (not to a fixed one), then the op runs with autocast off.

def register_autocast(name: str, library: torch.library.Library = LIBRARY) -> None:
    """Register the autocast kernels (CPU and CUDA) of forward op ``tritondeconv::name``."""
    op = getattr(torch.ops.tritondeconv, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def autocast(_keyset, *args, device_type=device_type, excluded=excluded):
            dtype = torch.get_autocast_dtype(device_type)
            args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                    and a.device.type == device_type else a for a in args]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*args)

        library.impl(name, autocast, key, with_keyset=True)


register_autocast("conv_transpose")


# ---------------------------------------------------------------- FLOP counts
# ``torch.utils.flop_counter.FlopCounterMode`` counts each op as it counts the aten
# convolution (or convolution gradient) that computes the same: its own formula, on the
# shapes aten's would see, so MFU reports come out as they do for PyTorch's layers.


def _batched_shape(x_shape, w_shape) -> list:
    """An input's shape with the batch axis that an unbatched one lacks."""
    return [1, *x_shape] if len(x_shape) == len(w_shape) - 1 else list(x_shape)


def _swapped(shape) -> list:
    """The shape with its first two axes swapped (how aten counts a weight gradient)."""
    return [shape[1], shape[0], *shape[2:]]


def conv_transpose_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The FLOPs of a transposed convolution (the forward ops' formula)."""
    return flop_counter.conv_flop_count(_batched_shape(x_shape, w_shape), w_shape, out_shape, transposed=True)


def _input_grad_flops(grad_out_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.conv_flop_count(grad_out_shape, w_shape, out_shape, transposed=False)


def _weight_grad_flops(x_shape, grad_out_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.conv_flop_count(_swapped(grad_out_shape), _swapped(x_shape), _swapped(out_shape))


flop_counter.register_flop_formula(ops.conv_transpose)(conv_transpose_flops)
flop_counter.register_flop_formula(ops.conv_transpose_input_grad)(_input_grad_flops)
flop_counter.register_flop_formula(ops.conv_transpose_weight_grad)(_weight_grad_flops)
