"""The op layer: the ``torch.ops.tritondeconv`` ops, their fake (meta) implementations
and their dispatch to the kernels.

Public:
  ``conv_transpose``          every transposed convolution, any spatial rank (the length
                              of ``stride``), with the optional epilogue (activation,
                              residual): the one implementation
  ``conv_transpose1d``, ``conv_transpose2d``, ``conv_transpose3d``
                              aten's signatures, thin registrations over ``conv_transpose``
  ``conv_transpose2d_fused``  the same with the epilogue (the 2-D name earlier versions had)
  ``naive_conv_transpose2d``  the zero-insertion baseline (``baselines.py``)
Internal (the gradients of a transposed convolution, rank-generic, differentiable
themselves so that double backward works; see ``autograd.py``):
  ``conv_transpose_input_grad``   grad_input: the zero-free strided convolution
  ``conv_transpose_weight_grad``  grad_weight: taps as GEMM columns, a split reduction

Each has a fake implementation, so meta tensors work and ``torch.compile(fullgraph=True)``
traces through them as opaque nodes; being opaque, each shape keeps its own autotuning
under compile (``docs/design.md`` says why not a ``triton_op``).

Where the work runs:
  * CUDA tensors: always the Triton kernels.
  * CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels, run by the Triton
    interpreter (this is how CI tests the kernels).
  * CPU tensors otherwise: aten's convolutions (Triton has no CPU backend).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad

from .arguments import (
    ConvTransposeArgs,
    as_batched,
    check_conv_transpose,
    format_strides,
    output_memory_format,
)
from .kernels import launcher
from .kernels.common import INTERPRETING, allocated
from .kernels.activations import ACTIVATIONS, TABLE as ACTIVATION_TABLE
from .kernels.phase_gemm import phase_gemm
from .kernels.tuning import NoConfigurationRan
from .kernels.weight_grad import weight_grad
from .planner import output_size
from .weights import PACKED, ThreadDepth

def runs_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels (see the module docstring;
    also any device while the kernels' launches are replaced through
    ``kernels.launcher.intercept``)."""
    kind = device.type
    return kind == "cuda" or (INTERPRETING and kind == "cpu") or launcher.launches_replaced()


BACKENDS = ("triton", "auto")


def _backend_from_environment() -> str:
    name = os.environ.get("TRITONDECONV_BACKEND", "triton") or "triton"
    if name not in BACKENDS:
        warnings.warn(f"tritondeconv: TRITONDECONV_BACKEND must be one of {', '.join(BACKENDS)}, but is {name!r}; "
                      "using 'triton'")
        return "triton"
    return name


_BACKEND = [_backend_from_environment()]


def set_backend(backend: str) -> None:
    """Which implementation the ops run where the kernels run:

    * ``"triton"`` (default): always our Triton kernels (bitwise-reproducible, the
      output's strides exactly aten's);
    * ``"auto"``: on each op's first call for a shape, our kernels race aten's own
      convolution (cuDNN on a GPU), forward and each gradient apart, and the faster is
      remembered for that shape (in this process and in the tuning cache).

    ``TRITONDECONV_BACKEND`` sets the starting value."""
    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {', '.join(BACKENDS)}, but got {backend!r}")
    _BACKEND[0] = backend


def get_backend() -> str:
    """The backend ``set_backend`` set (see there)."""
    return _BACKEND[0]


def _race_key(op: str, call: tuple) -> tuple:
    """The shape class a race is kept for: the op and its arguments, tensors by shape,
    strides and dtype."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.stride(), str(value.dtype))
        return tuple(value) if isinstance(value, (list, tuple)) else value
    return (op, *(describe(v) for v in call))


def _computed(op: str, device: torch.device, kernels, aten, call: tuple = ()) -> torch.Tensor:
    """``kernels()`` where the Triton kernels run, ``aten()`` elsewhere, and ``aten()``
    with a warning where no configuration of a kernel could run for the shape (a first
    call never fails for the tuner's sake).  Under the ``"auto"`` backend, whichever of
    the two won the race for ``op`` on these arguments (``call``)."""
    if not runs_triton(device):
        return aten()
    try:
        if _BACKEND[0] == "auto":
            runs = {"tritondeconv": kernels, "aten": aten}
            return runs[launcher.race(device, _race_key(op, call), runs)]()
        return kernels()
    except NoConfigurationRan as error:
        warnings.warn(f"{error}; computed by aten's convolution instead")
        return aten()


def _allow_tf32(dtype: torch.dtype = torch.float32) -> bool:
    """Whether products of ``dtype`` tensors may round to TF32: never but for float32,
    and for float32 as aten's convolution decides it:
    the precision set for cuDNN convolutions (``torch.backends.cudnn.conv.fp32_precision``),
    where that is "none" the one set for cuDNN as a whole, then the global one
    (``torch.backends.fp32_precision``); TF32 only where the first that is set says
    "tf32".  The legacy ``torch.backends.cudnn.allow_tf32`` writes the convolution's
    setting, so it is honoured too; its getter is never called (it raises once the two
    APIs have been mixed)."""
    if dtype != torch.float32:
        return False
    for backend, operation in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
        precision = torch._C._get_fp32_precision_getter(backend, operation)
        if precision != "none":
            return precision == "tf32"
    return False


def empty_in_format(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A new tensor of ``shape`` in ``like``'s dtype and device and in ``memory_format``
    (every tensor the ops return is allocated here or in ``_empty_output``, and filled if
    ``kernels.common.poison_allocations`` asks; ``channels_last`` for a 3-D shape puts
    its channels innermost)."""
    return allocated(like.new_empty_strided(shape, format_strides(tuple(shape), memory_format)))


def _empty_output(x: torch.Tensor, args: ConvTransposeArgs) -> torch.Tensor:
    """The output of a transposed convolution of batched ``x``, laid out as aten lays out
    its output (the checked ``args`` hold its shape and strides)."""
    return allocated(x.new_empty_strided(args.output_shape, args.output_strides))


def _as_aten_would(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """aten's own result, in the memory format our fake implementation promises (aten's
    CPU backends sometimes pick another layout by heuristics of their own)."""
    memory_format = output_memory_format(x, weight)
    if out.stride() == format_strides(tuple(out.shape), memory_format):
        return out
    return empty_in_format(out.shape, out, memory_format).copy_(out)


# ---------------------------------------------------------------- conv_transpose{1,2,3}d


_CARRIED = ThreadDepth()  # how many tritondeconv autograd Functions are running their forward


def tangents_carried() -> ThreadDepth:
    """Marks the ops called in the block as called by a ``torch.autograd.Function`` that
    carries their forward-mode tangents itself (``autograd.TransposedConv`` and kin)."""
    return _CARRIED


def _refuse_forward_ad(op: str, *tensors) -> None:
    """A clear error instead of a silently dropped tangent.  A custom op's registered
    autograd is backward-only: forward-mode AD (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) must come through the public functions, whose
    Functions carry it.  Called directly inside a forward-AD level, the op cannot tell
    whether ``torch.func.jvp`` unwrapped a tangent away, so it refuses."""
    if forward_ad._current_level < 0 or _CARRIED.depth:
        return
    if torch._C._is_fwd_grad_enabled() or any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"torch.ops.tritondeconv.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported "
            f"on the op itself; call tritondeconv.{op.removesuffix('_fused')} (or the nn modules), which support it")


# One op computes every transposed convolution, of any spatial rank (the length of
# ``stride``), with the epilogue; the ops with aten's signatures (what models call
# through ``torch.ops``) are thin registrations over it.  Defined through
# ``torch.library.Library`` rather than ``custom_op``: the same schema, fake and autograd
# registrations, for a few microseconds less per call (``docs/design.md``).

LIBRARY = torch.library.Library("tritondeconv", "DEF")

LIBRARY.define(
    "conv_transpose(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] output_padding, "
    "int groups, int[] dilation, str? activation=None, float negative_slope=0.01, Tensor? residual=None) -> Tensor"
)


class Call(NamedTuple):
    """One checked call of the op: the batched input and residual, the normalised
    arguments, whether the input was unbatched, and the name errors are reported under."""

    x: torch.Tensor
    args: ConvTransposeArgs
    unbatched: bool
    residual: torch.Tensor | None
    name: str


_NAMES = {rank: f"conv_transpose{rank}d" for rank in (1, 2, 3)}  # the name errors are reported under, by rank


def prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, residual) -> Call:
    """Check every argument of ``conv_transpose`` (the implementation and the fake share
    this step); the rank is the length of ``stride``."""
    rank = len(stride)
    name = _NAMES.get(rank)
    if name is None:
        raise RuntimeError(f"conv_transpose: expected stride to have 1, 2 or 3 entries (the spatial rank), "
                           f"but got stride={list(stride)}")
    x, unbatched = as_batched(input, rank, name)
    args = check_conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, rank, name)
    if activation is not None and activation not in ACTIVATIONS:
        raise RuntimeError(f"{name}: activation must be None or one of {', '.join(ACTIVATIONS)}, "
                           f"but got activation={activation!r}")
    if residual is not None:
        if tuple(residual.shape) != args.output_shape[unbatched:]:
            raise RuntimeError(f"{name}: expected residual of the output's size {list(args.output_shape[unbatched:])}, "
                               f"but got {list(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise RuntimeError(f"{name}: expected residual to have the input's dtype and device, "
                               f"but got {residual.dtype} on {residual.device}")
        residual = residual.unsqueeze(0) if unbatched else residual
    return Call(x, args, unbatched, residual, name)


def launch_transposed(x: torch.Tensor, weight: torch.Tensor, bias, args: ConvTransposeArgs, stride,
                      activation=None, negative_slope=0.01, residual=None, out=None) -> torch.Tensor:
    """Run the phase kernel with the given stride (the naive baseline passes 1) into
    ``out`` (batched, any strides) or a new output laid out as aten lays out its own,
    with an optional fused epilogue.  Every rank runs on the kernel's three spatial
    axes, the missing leading ones of size 1."""
    out = _empty_output(x, args) if out is None else out
    if out.numel() == 0:
        return out
    phase_gemm(out, x, PACKED.get(weight, 1), bias, tuple(stride), args.padding, args.dilation, args.groups,
               transposed=True, allow_tf32=_allow_tf32(x.dtype), activation=activation, negative_slope=negative_slope,
               residual=residual)
    return out


def aten_transposed(x, weight, bias, stride, args: ConvTransposeArgs, output_padding, activation=None,
                    negative_slope=0.01, residual=None) -> torch.Tensor:
    """The same through aten's convolution (where the kernels do not run), laid out as
    ``launch_transposed`` lays out its output."""
    out = torch.convolution(x, weight, bias, stride, args.padding, args.dilation, True, output_padding, args.groups)
    if activation is not None:
        out = ACTIVATION_TABLE[activation].torch(out, negative_slope)
    return _as_aten_would(out if residual is None else out + residual, x, weight)


def _transposed(call: Call, weight, bias, activation, negative_slope, out=None) -> torch.Tensor:
    """The checked ``call``'s transposed convolution (batched), by the kernels or by aten
    (``_computed`` decides), into ``out`` or a new output."""
    x, args, r = call.x, call.args, call.residual

    def aten():
        result = aten_transposed(x, weight, bias, args.stride, args, args.output_padding, activation, negative_slope, r)
        return result if out is None else out.copy_(result)

    return _computed(
        call.name, x.device,
        functools.partial(launch_transposed, x, weight, bias, args, args.stride, activation, negative_slope, r, out),
        aten, (x, weight, bias, args.stride, args.padding, args.output_padding, args.groups, args.dilation, activation,
               negative_slope, r),
    )


def _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation=None,
                    negative_slope=0.01, residual=None):
    """``activation(conv_transpose(input, weight) + bias) + residual``, the activation
    and the residual applied in the kernel's epilogue (one pass over the output)."""
    _refuse_forward_ad("conv_transpose", input, weight, bias, residual)
    call = prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, residual)
    out = _transposed(call, weight, bias, activation, negative_slope)
    return out.squeeze(0) if call.unbatched else out


def conv_transpose_into(out: torch.Tensor, input, weight, bias, stride, padding, output_padding, groups, dilation,
                        activation=None, negative_slope=0.01, residual=None) -> torch.Tensor:
    """``conv_transpose`` (arguments parsed: one entry per spatial axis) written into
    ``out``, any strides (a slice of a larger tensor among them), by PyTorch's ``out=``
    rules: ``out`` has the output's shape (a tensor with no elements is resized to it),
    the input's dtype and device, and shares no memory with an argument; and autograd
    cannot record it (an error where it would have to).  Returns ``out``."""
    call = prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, residual)
    arguments = {"input": input, "weight": weight, "bias": bias, "residual": residual}
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, *arguments.values())):
        raise RuntimeError(f"{call.name}(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad")
    shape = call.args.output_shape[call.unbatched:]
    if out.numel() == 0 and tuple(out.shape) != shape:
        out.resize_(shape)
    if tuple(out.shape) != shape:
        raise RuntimeError(f"{call.name}: expected out to have the output's size {list(shape)}, but got {list(out.shape)}")
    if out.dtype != input.dtype or out.device != input.device:
        raise RuntimeError(f"{call.name}: expected out to have the input's dtype {input.dtype} and device "
                           f"{input.device}, but got {out.dtype} on {out.device}")
    for name, tensor in arguments.items():
        if tensor is not None and torch._C._overlaps(out, tensor):
            raise RuntimeError(f"{call.name}: out shares memory with {name}; out= needs memory of its own")
    if out.numel() == 0:
        return out
    if (torch.compiler.is_compiling() or torch._C._has_torch_function((out, input, weight))
            or torch._C._functorch.peek_interpreter_stack() is not None):  # (through the op, then copied)
        return out.copy_(conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                        activation, negative_slope, residual))
    _transposed(call, weight, bias, activation, negative_slope, out.unsqueeze(0) if call.unbatched else out)
    return out


def _conv_transpose_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, activation=None,
                         negative_slope=0.01, residual=None):
    call = prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, residual)
    out = _empty_output(call.x, call.args)
    return out.squeeze(0) if call.unbatched else out


LIBRARY.impl("conv_transpose", _conv_transpose, "CompositeExplicitAutograd")
torch.library.register_fake("tritondeconv::conv_transpose", _conv_transpose_fake, lib=LIBRARY)
conv_transpose = torch.ops.tritondeconv.conv_transpose.default

# The ops with aten's signatures, and the 2-D one with the epilogue that earlier
# versions exposed: each is the one op (its autograd, fake and autocast come from it).
# (A Python kernel receives only the arguments that differ from the schema's defaults.)


def _with_aten_signature(rank: int):
    def op(input, weight, bias=None, stride=(1,) * rank, padding=(0,) * rank, output_padding=(0,) * rank, groups=1,
           dilation=(1,) * rank, activation=None, negative_slope=0.01, residual=None):
        return conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                              negative_slope, residual)
    return op


for _rank in (1, 2, 3):
    LIBRARY.define(
        f"conv_transpose{_rank}d(Tensor input, Tensor weight, Tensor? bias=None, int[{_rank}] stride=1, "
        f"int[{_rank}] padding=0, int[{_rank}] output_padding=0, int groups=1, int[{_rank}] dilation=1) -> Tensor")
    LIBRARY.impl(f"conv_transpose{_rank}d", _with_aten_signature(_rank), "CompositeImplicitAutograd")
LIBRARY.define(
    "conv_transpose2d_fused(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] output_padding, int groups, int[2] dilation, str? activation, float negative_slope, Tensor? residual) "
    "-> Tensor")
LIBRARY.impl("conv_transpose2d_fused", _with_aten_signature(2), "CompositeImplicitAutograd")


# ---------------------------------------------------------------- gradients


def transposed_output_padding(input_size, output_size_, kernel_size, stride, padding, dilation) -> list[int]:
    """The output_padding with which a transposed convolution of ``input_size`` produces
    ``output_size_`` (how the gradient ops recover it from their tensors' sizes)."""
    return [
        o - output_size(i, k, s, p, d, 0)
        for i, o, k, s, p, d in zip(input_size, output_size_, kernel_size, stride, padding, dilation)
    ]


def _input_grad_empty(grad_output: torch.Tensor, weight: torch.Tensor, input_size) -> torch.Tensor:
    """grad_input, laid out as aten lays out the convolution of grad_output by weight."""
    shape = (grad_output.shape[0], weight.shape[0], *input_size)
    return empty_in_format(shape, grad_output, output_memory_format(grad_output, weight))


LIBRARY.define("conv_transpose_input_grad(Tensor grad_output, Tensor weight, int[] input_size, int[] stride, "
               "int[] padding, int[] dilation, int groups) -> Tensor")
LIBRARY.define("conv_transpose_weight_grad(Tensor input, Tensor grad_output, int[] kernel_size, int[] stride, "
               "int[] padding, int[] dilation, int groups) -> Tensor")


def _input_grad(grad_output, weight, input_size, stride, padding, dilation, groups):
    """grad_input of a transposed convolution whose (batched) input had spatial size
    ``input_size``: the strided convolution ``conv(grad_output, weight)`` (the weight,
    ``[C_in, C_out/g, *k]``, is already a convolution weight mapping C_out to C_in
    channels), computed without any inserted zero."""
    _refuse_forward_ad("conv_transpose_input_grad", grad_output, weight)
    out = _input_grad_empty(grad_output, weight, input_size)
    if out.numel() == 0:
        return out

    def aten():
        full = torch.convolution(grad_output, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)
        return out.copy_(full[(..., *(slice(0, i) for i in input_size))])

    def kernels():
        phase_gemm(out, grad_output, PACKED.get(weight, 0), None, tuple(stride), tuple(padding), tuple(dilation),
                   groups, transposed=False, allow_tf32=_allow_tf32(grad_output.dtype))
        return out

    return _computed("conv_transpose_input_grad", grad_output.device, kernels, aten,
                     (grad_output, weight, input_size, stride, padding, dilation, groups))


def _input_grad_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    return _input_grad_empty(grad_output, weight, input_size)


def _weight_grad(input, grad_output, kernel_size, stride, padding, dilation, groups):
    """grad_weight ``[C_in, C_out/g, *kernel_size]`` of a transposed convolution of the
    (batched) ``input`` that produced ``grad_output``'s shape."""
    _refuse_forward_ad("conv_transpose_weight_grad", input, grad_output)
    c_in, c_out_g = input.shape[1], grad_output.shape[1] // groups

    def aten():
        output_padding = transposed_output_padding(input.shape[2:], grad_output.shape[2:], kernel_size, stride, padding, dilation)
        weight = input.new_empty((c_in, c_out_g, *kernel_size))
        return torch.ops.aten.convolution_backward(
            grad_output, input, weight, None, stride, padding, dilation, True, output_padding, groups, [False, True, False]
        )[1].contiguous()

    def kernels():
        return weight_grad(input, grad_output, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups,
                           allow_tf32=_allow_tf32(input.dtype))[0]

    return _computed("conv_transpose_weight_grad", input.device, kernels, aten,
                     (input, grad_output, kernel_size, stride, padding, dilation, groups))


def _weight_grad_fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
    return input.new_empty((input.shape[1], grad_output.shape[1] // groups, *kernel_size))


for _name, _impl, _fake in (("conv_transpose_input_grad", _input_grad, _input_grad_fake),
                            ("conv_transpose_weight_grad", _weight_grad, _weight_grad_fake)):
    LIBRARY.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tritondeconv::{_name}", _fake, lib=LIBRARY)

# Each op's implementation (its CPU and CUDA kernel), by op, for the autograd kernels,
# which call it directly on plain tensors.
IMPLEMENTATIONS = {torch.ops.tritondeconv.conv_transpose.default: _conv_transpose,
                   torch.ops.tritondeconv.conv_transpose_input_grad.default: _input_grad,
                   torch.ops.tritondeconv.conv_transpose_weight_grad.default: _weight_grad}


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
