"""The op layer: the ``torch.ops.tritondeconv`` ops, their fake (meta) implementations
and their dispatch to the kernels.

Public (aten's signatures):
  ``conv_transpose1d``, ``conv_transpose2d``, ``conv_transpose3d``
                              stride-phase transposed convolution, one kernel for all ranks
  ``naive_conv_transpose2d``  the zero-insertion baseline on the same kernel
  ``conv_transpose2d_fused``  with an activation and a residual fused into the epilogue
Internal (the gradients of a transposed convolution, rank-generic, differentiable
themselves so that double backward works; see ``autograd.py``):
  ``conv_transpose_input_grad``   grad_input: the zero-free strided convolution
  ``conv_transpose_weight_grad``  grad_weight: per-tap GEMMs with a split reduction

All are ``torch.library.custom_op``s with a fake implementation, so meta tensors work
and ``torch.compile(fullgraph=True)`` traces through them as opaque nodes; being
opaque, each shape keeps its own autotuning under compile (``docs/design.md`` says why
not a ``triton_op``).

Where the work runs:
  * CUDA tensors: always the Triton kernels.
  * CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels, run by the Triton
    interpreter (this is how CI tests the kernels).
  * CPU tensors otherwise: aten's convolutions (Triton has no CPU backend).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from .arguments import (
    ConvTransposeArgs,
    as_batched,
    check_conv_transpose,
    check_tensor_types,
    output_memory_format,
)
from .kernels import launcher
from .kernels.common import INTERPRETING, allocated
from .kernels.activations import ACTIVATIONS, TABLE as ACTIVATION_TABLE
from .kernels.phase_gemm import phase_gemm
from .kernels.tuning import NoConfigurationRan
from .kernels.weight_grad import weight_grad
from .planner import output_size

_FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def runs_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels (see the module docstring;
    also any device while the kernels' launches are replaced through
    ``kernels.launcher.intercept``)."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETING) or launcher.launches_replaced()


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


def _as5d(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` (1 to 3 spatial axes) as a ``[N, C, D, H, W]`` view."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def _geometry5d(rank: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """Stride, padding and dilation padded to three axes: the missing leading axes get
    stride 1, padding 0, dilation 1 (they have size 1)."""
    lead = 3 - rank
    return (1,) * lead + tuple(stride), (0,) * lead + tuple(padding), (1,) * lead + tuple(dilation)


def pack_weight(weight: torch.Tensor, columns: int = 1) -> torch.Tensor:
    """The weight ``[C_in, C_out/g, *k]`` with axis ``columns`` (the GEMM's columns: 1,
    C_out, in the forward; 0, C_in, in the input gradient) innermost and the other
    channel axis next: same logical shape, new strides, so that a tap's
    ``[reduction, columns]`` tile is read along contiguous memory.  A weight already
    laid out so is returned as it is (no copy): a module that keeps its weight packed
    (``nn.ConvTranspose*d`` in inference) passes it through here for free."""
    order = [*range(2, weight.dim()), 1 - columns, columns]
    inverse = [order.index(i) for i in range(weight.dim())]
    return weight.permute(order).contiguous().permute(inverse)


def _allow_tf32() -> bool:
    """Whether fp32 products may round to TF32, decided as aten's convolution decides it:
    the precision set for cuDNN convolutions (``torch.backends.cudnn.conv.fp32_precision``),
    where that is "none" the one set for cuDNN as a whole, then the global one
    (``torch.backends.fp32_precision``); TF32 only where the first that is set says
    "tf32".  The legacy ``torch.backends.cudnn.allow_tf32`` writes the convolution's
    setting, so it is honoured too; its getter is never called (it raises once the two
    APIs have been mixed)."""
    for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
        precision = torch._C._get_fp32_precision_getter(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


def _empty(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A new tensor of ``shape`` in ``like``'s dtype and device and in ``memory_format``
    (every tensor the ops return is allocated here, and filled if
    ``kernels.common.poison_allocations`` asks; ``channels_last`` for a 3-D shape puts
    its channels innermost)."""
    if len(shape) == 3 and memory_format == torch.channels_last:
        n, c, w = shape
        return allocated(torch.empty((n, w, c), dtype=like.dtype, device=like.device).permute(0, 2, 1))
    return allocated(torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format))


def _empty_output(x: torch.Tensor, weight: torch.Tensor, args: ConvTransposeArgs) -> torch.Tensor:
    """The output of a transposed convolution of batched ``x`` by ``weight``, laid out as
    aten lays out its output (``arguments.output_memory_format``)."""
    return _empty(args.output_shape, x, output_memory_format(x, weight))


def _as_aten_would(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """aten's own result, in the memory format our fake implementation promises (aten's
    CPU backends sometimes pick another layout by heuristics of their own)."""
    memory_format = output_memory_format(x, weight)
    if out.stride() == _empty(out.shape, out.to("meta"), memory_format).stride():  # (strides without allocating)
        return out
    return _empty(out.shape, out, memory_format).copy_(out)


# ---------------------------------------------------------------- conv_transpose{1,2,3}d


_CARRIED = threading.local()  # .depth: how many tritondeconv autograd Functions are running their forward


@contextlib.contextmanager
def tangents_carried():
    """Marks the ops called in the block as called by a ``torch.autograd.Function`` that
    carries their forward-mode tangents itself (``autograd.TransposedConv`` and kin)."""
    _CARRIED.depth = getattr(_CARRIED, "depth", 0) + 1
    try:
        yield
    finally:
        _CARRIED.depth -= 1


def _refuse_forward_ad(op: str, *tensors) -> None:
    """A clear error instead of a silently dropped tangent.  A custom op's registered
    autograd is backward-only: forward-mode AD (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) must come through the public functions, whose
    Functions carry it.  Called directly inside a forward-AD level, the op cannot tell
    whether ``torch.func.jvp`` unwrapped a tangent away, so it refuses."""
    if forward_ad._current_level < 0 or getattr(_CARRIED, "depth", 0):
        return
    if torch._C._is_fwd_grad_enabled() or any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"torch.ops.tritondeconv.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported "
            f"on the op itself; call tritondeconv.{op.removesuffix('_fused')} (or the nn modules), which support it")


def _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, rank, op):
    """Check the arguments; return the batched input, the checked args and whether the
    input was unbatched."""
    x, unbatched = as_batched(input, rank, op)
    args = check_conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, rank, op)
    return x, args, unbatched


def _launch_transposed(x: torch.Tensor, weight: torch.Tensor, bias, args: ConvTransposeArgs, stride,
                       activation=None, negative_slope=0.01, residual=None) -> torch.Tensor:
    """Run the phase kernel with the given stride (the naive op passes 1) into a new
    output laid out like ``x``, with an optional fused epilogue.  Every rank runs on the
    kernel's three spatial axes, the missing leading ones of size 1."""
    out = _empty_output(x, weight, args)
    if out.numel() == 0:
        return out
    stride, padding, dilation = _geometry5d(len(stride), stride, args.padding, args.dilation)
    phase_gemm(
        _as5d(out), _as5d(x), _as5d(pack_weight(weight, columns=1)), bias, stride, padding, dilation, args.groups,
        transposed=True, allow_tf32=_allow_tf32(), activation=activation, negative_slope=negative_slope,
        residual=None if residual is None else _as5d(residual),
    )
    return out


def zero_insert(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], output_padding: Sequence[int]) -> torch.Tensor:
    """``x`` ``[N, C, *spatial]`` with ``s - 1`` zeros between pixels and
    ``output_padding`` zeros after the last one along each axis: size
    ``(n - 1)*s + 1 + output_padding`` per axis, laid out as the output of a convolution
    of ``x`` by ``weight``."""
    spatial = x.shape[2:]
    shape = (*x.shape[:2], *((n - 1) * s + 1 + op for n, s, op in zip(spatial, stride, output_padding)))
    up = _empty(shape, x, output_memory_format(x, weight))
    up.zero_()[(slice(None), slice(None), *(slice(0, (n - 1) * s + 1, s) for n, s in zip(spatial, stride)))] = x
    return up


def _define_conv_transpose(name: str, rank: int, naive: bool):
    """Register ``tritondeconv::{name}``, aten's signature for the rank.

    ``naive``: the textbook method instead of the decomposition: insert zeros, then a
    stride-1 transposed convolution (an ordinary convolution with the flipped,
    transposed weight and padding ``d*(k-1) - p``), on the same kernel with stride 1
    (one phase holding every tap), so that against the decomposed op only the
    decomposition differs.
    """
    schema = (
        f"(Tensor input, Tensor weight, Tensor? bias=None, int[{rank}] stride=1, int[{rank}] padding=0, "
        f"int[{rank}] output_padding=0, int groups=1, int[{rank}] dilation=1) -> Tensor"
    )

    def impl(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        _refuse_forward_ad(name, input, weight, bias)
        x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, rank, name)
        run_stride, run_output_padding = args.stride, args.output_padding
        if naive:
            x = zero_insert(x, weight, args.stride, args.output_padding)
            run_stride, run_output_padding = (1,) * rank, (0,) * rank
        out = _computed(
            name, x.device,
            lambda: _launch_transposed(x, weight, bias, args, run_stride),
            lambda: _as_aten_would(_FUNCTIONAL[rank](x, weight, bias, run_stride, args.padding, run_output_padding,
                                                     args.groups, args.dilation), x, weight),
            (x, weight, bias, run_stride, args.padding, run_output_padding, args.groups, args.dilation),
        )
        return out.squeeze(0) if unbatched else out

    def fake(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, rank, name)
        out = _empty_output(x, weight, args)
        return out.squeeze(0) if unbatched else out

    op = torch.library.custom_op(f"tritondeconv::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


for _rank in (1, 2, 3):
    _define_conv_transpose(f"conv_transpose{_rank}d", _rank, naive=False)
_define_conv_transpose("naive_conv_transpose2d", 2, naive=True)


# ---------------------------------------------------------------- fused epilogue

def _check_epilogue(activation, residual, out_shape, x: torch.Tensor, op: str) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise RuntimeError(f"{op}: activation must be None or one of {', '.join(ACTIVATIONS)}, but got activation={activation!r}")
    if residual is None:
        return
    if tuple(residual.shape) != tuple(out_shape):
        raise RuntimeError(f"{op}: expected residual of the output's size {list(out_shape)}, but got {list(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise RuntimeError(f"{op}: expected residual to have the input's dtype and device, but got {residual.dtype} on {residual.device}")


@torch.library.custom_op(
    "tritondeconv::conv_transpose2d_fused",
    mutates_args=(),
    schema=(
        "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] output_padding, "
        "int groups, int[2] dilation, str? activation, float negative_slope, Tensor? residual) -> Tensor"
    ),
)
def _conv_transpose2d_fused_op(input, weight, bias, stride, padding, output_padding, groups, dilation,
                               activation, negative_slope, residual):
    """``activation(conv_transpose2d(...)) + residual``, the activation and the residual
    applied in the kernel's epilogue (one pass over the output)."""
    op = "conv_transpose2d"
    _refuse_forward_ad("conv_transpose2d_fused", input, weight, bias, residual)
    x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, 2, op)
    _check_epilogue(activation, residual, args.output_shape[unbatched:], x, op)
    r = None if residual is None else (residual.unsqueeze(0) if unbatched else residual)
    def aten():
        out = F.conv_transpose2d(x, weight, bias, args.stride, args.padding, args.output_padding, args.groups, args.dilation)
        out = ACTIVATION_TABLE[activation].torch(out, negative_slope) if activation else out
        return _as_aten_would(out if r is None else out + r, x, weight)

    out = _computed("conv_transpose2d_fused", x.device,
                    lambda: _launch_transposed(x, weight, bias, args, args.stride, activation, negative_slope, r), aten,
                    (x, weight, bias, args.stride, args.padding, args.output_padding, args.groups, args.dilation,
                     activation, negative_slope, r))
    return out.squeeze(0) if unbatched else out


@_conv_transpose2d_fused_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, negative_slope, residual):
    op = "conv_transpose2d"
    x, args, unbatched = _prepare(input, weight, bias, stride, padding, output_padding, groups, dilation, 2, op)
    _check_epilogue(activation, residual, args.output_shape[unbatched:], x, op)
    out = _empty_output(x, weight, args)
    return out.squeeze(0) if unbatched else out


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
    return _empty(shape, grad_output, output_memory_format(grad_output, weight))


@torch.library.custom_op(
    "tritondeconv::conv_transpose_input_grad",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
)
def _input_grad_op(grad_output, weight, input_size, stride, padding, dilation, groups):
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
        stride5, padding5, dilation5 = _geometry5d(len(stride), stride, padding, dilation)
        phase_gemm(
            _as5d(out), _as5d(grad_output), _as5d(pack_weight(weight, columns=0)), None, stride5, padding5, dilation5,
            groups, transposed=False, allow_tf32=_allow_tf32(),
        )
        return out

    return _computed("conv_transpose_input_grad", grad_output.device, kernels, aten,
                     (grad_output, weight, input_size, stride, padding, dilation, groups))


@_input_grad_op.register_fake
def _(grad_output, weight, input_size, stride, padding, dilation, groups):
    return _input_grad_empty(grad_output, weight, input_size)


@torch.library.custom_op(
    "tritondeconv::conv_transpose_weight_grad",
    mutates_args=(),
    schema="(Tensor input, Tensor grad_output, int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
)
def _weight_grad_op(input, grad_output, kernel_size, stride, padding, dilation, groups):
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
        stride5, padding5, dilation5 = _geometry5d(len(stride), stride, padding, dilation)
        kernel5 = (1,) * (3 - len(kernel_size)) + tuple(kernel_size)
        grad = weight_grad(
            _as5d(input), _as5d(grad_output), kernel5, stride5, padding5, dilation5, groups, allow_tf32=_allow_tf32()
        )
        return grad.reshape(c_in, c_out_g, *kernel_size)

    return _computed("conv_transpose_weight_grad", input.device, kernels, aten,
                     (input, grad_output, kernel_size, stride, padding, dilation, groups))


@_weight_grad_op.register_fake
def _(input, grad_output, kernel_size, stride, padding, dilation, groups):
    return input.new_empty((input.shape[1], grad_output.shape[1] // groups, *kernel_size))


# ---------------------------------------------------------------- autocast
# Under torch.autocast the forward ops behave as aten's convolutions do: their
# floating-point tensors on the autocast device, float64 excepted, are cast to the
# autocast dtype of the region (not to a fixed one), then the op runs with autocast off.

_AUTOCAST = torch.library.Library("tritondeconv", "IMPL")


def _register_autocast(name: str) -> None:
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

        _AUTOCAST.impl(name, autocast, key, with_keyset=True)


for _name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "naive_conv_transpose2d",
              "conv_transpose2d_fused"):
    _register_autocast(_name)
