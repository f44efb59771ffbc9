"""The ops' implementations (their CPU and CUDA kernels), as prepared calls.

A class of calls is everything a call's work depends on but the tensors' values and
addresses: every tensor's shape, strides, dtype and device, the geometry, the
epilogue, and the settings that decide the computation (TF32, 64-bit indexing, the
backend).  The first call of a class checks its arguments, lays out its output, lets
the kernels' launchers tune and race (``kernels.launcher``) and computes its result;
it also keeps a prepared call (``Forward``, ``InputGradient``, ``WeightGradient``)
holding what it decided: the output's size and strides, how the weight is read, and
the prepared launches (``launcher.PreparedLaunch``), or aten's convolution where that
computes the class.  A later call of the class allocates its output and launches,
nothing else.  A prepared call holds until the kernels' epoch changes
(``kernels.common.EPOCH``: a tuning forgotten, a hook or setting changed), and none is
kept where a launch could not be (a hook replacing the launches, a first call during
CUDA-graph capture, no configuration that runs).

Where the kernels do not run (CPU tensors without ``TRITON_INTERPRET=1``), a class is
computed by aten's convolution; under the ``"auto"`` backend, by whichever of the two
won its race (``backends.computed``).
"""
from __future__ import annotations

import torch

from .arguments import Checked, Geometry, check_conv_transpose
from .backends import BACKEND, allow_tf32, computed
from .kernels.activations import TABLE as ACTIVATION_TABLE
from .kernels.common import EPOCH, INT64_FORCED, POISON, allocated
from .kernels.phase_gemm import phase_gemm
from .kernels.planner import output_size
from .kernels.weight_grad import weight_grad
from .layout import as_aten_would, empty_in_format, output_memory_format
from .weights import PACKED

CAPACITY = 4096  # prepared calls kept per op; beyond it, the oldest quarter is dropped


def _keep(cache: dict, key, prepared) -> None:
    """Keep ``prepared`` under ``key`` (not where the key cannot be hashed: symbolic sizes
    under ``torch.compile``)."""
    try:
        hash(key)
    except TypeError:
        return
    if len(cache) >= CAPACITY:
        for old in list(cache)[:CAPACITY // 4]:
            del cache[old]
    cache[key] = prepared


def _kept(cache: dict, key):
    """What ``_keep`` kept under ``key``, where it is still current (prepared in this
    epoch of the settings); None otherwise, and where the key cannot be hashed (a list
    for a geometry, a symbolic size)."""
    try:
        prepared = cache.get(key)
    except TypeError:
        return None
    return prepared if prepared is not None and prepared.epoch == EPOCH[0] else None


def _settings(dtype: torch.dtype) -> tuple:
    """What else decides a class's computation: TF32 (float32 only), 64-bit indexing
    forced, the backend."""
    return dtype is torch.float32 and allow_tf32(), bool(INT64_FORCED), BACKEND[0]


def _hashable(value):
    """An integer argument as the dispatcher passes it (a list) as a hashable value."""
    return tuple(value) if type(value) is list else value


# ---------------------------------------------------------------- the forward


class Forward:
    """A class of forward calls, prepared: ``self(x, w, b, r)`` computes the output of
    new tensors of the class (``x`` and ``r`` batched or not, as the class's first call
    had them), ``with_weight`` the same together with the weight as it was read (a
    recorded call keeps it for its backward, which then reads it as it is).

    ``shape``, ``strides``: the batched output's; ``unbatched``: the input comes without
    its batch axis; ``checked``: the checked arguments; ``activation``, ``slope``: the
    epilogue; ``repeat``: the kernels' prepared launches (``phase_gemm``'s repeat), or
    ``None`` where aten computes the class; ``empty``: the output has no elements;
    ``contiguous_bias``: the bias is read from a contiguous copy; ``name``: the function
    errors name; ``gradients``: the class's prepared gradients by the output gradient's
    strides (``gradients.Recorded`` fills it)."""

    __slots__ = ("epoch", "shape", "strides", "unbatched", "checked", "activation", "slope", "repeat", "empty",
                 "contiguous_bias", "name", "gradients")

    def __init__(self, checked: Checked, unbatched: bool, activation, slope: float, repeat, contiguous_bias: bool,
                 name: str):
        self.epoch = EPOCH[0]
        self.shape, self.strides = checked.output_shape, checked.output_strides
        self.unbatched, self.checked, self.activation, self.slope = unbatched, checked, activation, slope
        self.repeat, self.empty = repeat, 0 in checked.output_shape
        self.contiguous_bias, self.name = contiguous_bias, name
        self.gradients: dict = {}

    def __call__(self, x, w, b, r) -> torch.Tensor:
        return self.with_weight(x, w, b, r)[0]

    def into(self, out, x, w, b, r) -> None:
        """The output written into ``out`` (batched; the strides of the class's first)."""
        if self.unbatched:
            x = x.unsqueeze(0)
            r = None if r is None else r.unsqueeze(0)
        if self.repeat is None:
            out.copy_(_aten_forward(x, w, b, self.checked.geometry, self.activation, self.slope, r))
        elif not self.empty:
            self.repeat(out, x, PACKED.get(w, 1), b.contiguous() if self.contiguous_bias else b, r)

    def with_weight(self, x, w, b, r) -> tuple[torch.Tensor, torch.Tensor]:
        if self.unbatched:
            x = x.unsqueeze(0)
            r = None if r is None else r.unsqueeze(0)
        if self.repeat is None:
            out, w = _aten_forward(x, w, b, self.checked.geometry, self.activation, self.slope, r), w
        else:
            out = x.new_empty_strided(self.shape, self.strides)
            if POISON:
                out.fill_(POISON[-1])
            w = PACKED.get(w, 1)
            if not self.empty:
                self.repeat(out, x, w, b.contiguous() if self.contiguous_bias else b, r)
        return (out.squeeze(0) if self.unbatched else out), w


FORWARDS: dict = {}  # the prepared forwards, by class of calls (``forward_key``)
INTO: dict = {}  # the prepared forwards into a given output, by its strides and the class of calls


def forward_key(x, w, b, geometry: tuple, activation, slope: float, r) -> tuple:
    """The class of a forward call (``geometry``: the op's five integer arguments as
    given, hashable): every tensor's layout, dtype and device, the arguments, the
    settings."""
    return (x.shape, x.stride(), x.dtype, x.device, w.shape, w.stride(), w.dtype, w.device,
            None if b is None else (b.shape, b.stride(), b.dtype, b.device), geometry, activation, slope,
            None if r is None else (r.shape, r.stride(), r.dtype, r.device), *_settings(x.dtype))


def prepared_forward(x, w, b, geometry: tuple, activation, slope: float, r) -> Forward | None:
    """The prepared forward of the call's class, where one is kept and current."""
    return _kept(FORWARDS, forward_key(x, w, b, geometry, activation, slope, r))


_NAMES = {rank: f"conv_transpose{rank}d" for rank in (1, 2, 3)}  # the name errors are reported under, by rank


def check_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                  residual) -> tuple[Checked, bool, str]:
    """Every argument of a forward call checked (the rank is the length of ``stride``):
    ``(checked, unbatched, name)``; the op's fake implementation shares this step."""
    rank = len(stride)
    name = _NAMES.get(rank)
    if name is None:
        raise RuntimeError(f"conv_transpose: expected stride to have 1, 2 or 3 entries (the spatial rank), "
                           f"but got stride={list(stride)}")
    if input.dim() not in (rank + 1, rank + 2):
        raise RuntimeError(f"{name}: expected input to be {rank + 1}-D (unbatched) or {rank + 2}-D (batched), "
                           f"but got input of size {list(input.shape)}")
    unbatched = input.dim() == rank + 1
    checked = check_conv_transpose(input.unsqueeze(0) if unbatched else input, weight, bias, stride, padding,
                                   output_padding, groups, dilation, rank, name)
    if activation is not None and activation not in ACTIVATION_TABLE:
        raise RuntimeError(f"{name}: activation must be None or one of {', '.join(ACTIVATION_TABLE)}, "
                           f"but got activation={activation!r}")
    if residual is not None:
        if tuple(residual.shape) != checked.output_shape[unbatched:]:
            raise RuntimeError(f"{name}: expected residual of the output's size "
                               f"{list(checked.output_shape[unbatched:])}, but got {list(residual.shape)}")
        if residual.dtype != input.dtype or residual.device != input.device:
            raise RuntimeError(f"{name}: expected residual to have the input's dtype and device, "
                               f"but got {residual.dtype} on {residual.device}")
    return checked, unbatched, name


def conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation=None,
                   negative_slope=0.01, residual=None) -> torch.Tensor:
    """``activation(conv_transpose(input, weight) + bias) + residual``, the activation and
    the residual applied in the kernel's epilogue (one pass over the output): the op's
    implementation, by its class's prepared call after the first."""
    geometry = (_hashable(stride), _hashable(padding), _hashable(output_padding), groups, _hashable(dilation))
    prepared = prepared_forward(input, weight, bias, geometry, activation, negative_slope, residual)
    if prepared is not None:
        return prepared(input, weight, bias, residual)
    return first_forward(input, weight, bias, geometry, activation, negative_slope, residual)[0]


def first_forward(input, weight, bias, geometry: tuple, activation, slope: float, residual,
                  out: torch.Tensor | None = None, into_key=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward class's first call: check the arguments, compute the output (into
    ``out`` where given: batched, any strides), and keep the class's prepared call where
    one may be kept (in ``FORWARDS``, or with ``out`` in ``INTO`` under ``into_key``);
    ``(output, the weight as read)``."""
    checked, unbatched, name = check_forward(input, weight, bias, *geometry, activation, residual)
    x = input.unsqueeze(0) if unbatched else input
    r = residual.unsqueeze(0) if residual is not None and unbatched else residual
    g = checked.geometry
    result = out if out is not None else allocated(x.new_empty_strided(checked.output_shape, checked.output_strides))
    contiguous_bias = bias is not None and not bias.is_contiguous()
    packed = PACKED.get(weight, 1) if result.numel() else weight
    made = {}

    def kernels() -> torch.Tensor:
        if result.numel() == 0:
            made["repeat"] = None
            return result
        made["repeat"] = phase_gemm(result, x, packed, bias.contiguous() if contiguous_bias else bias, g.stride,
                                    g.padding, g.dilation, g.groups, transposed=True, allow_tf32=allow_tf32(x.dtype),
                                    activation=activation, negative_slope=slope, residual=r)
        return result

    def aten() -> torch.Tensor:
        answer = _aten_forward(x, weight, bias, g, activation, slope, r)
        return answer if out is None else out.copy_(answer)

    key = forward_key(input, weight, bias, geometry, activation, slope, residual)
    ours, result = computed(name, x.device, kernels, aten, key if out is None else into_key)
    if not ours or made.get("repeat") is not None or result.numel() == 0:
        ready = Forward(checked, unbatched, activation, slope, made.get("repeat") if ours else None, contiguous_bias,
                        name)
        if out is None:
            _keep(FORWARDS, key, ready)
        elif into_key is not None:
            _keep(INTO, into_key, ready)
    return (result.squeeze(0) if unbatched and out is None else result), (packed if ours else weight)


def _aten_forward(x, w, b, g: Geometry, activation, slope: float, r) -> torch.Tensor:
    """The forward through aten's convolution, laid out as the kernels lay out theirs."""
    out = torch.convolution(x, w, b, g.stride, g.padding, g.dilation, True, g.output_padding, g.groups)
    if activation is not None:
        out = ACTIVATION_TABLE[activation].torch(out, slope)
    return as_aten_would(out if r is None else out + r, x, w)


def transposed_output_padding(input_size, output_size_, kernel_size, stride, padding, dilation) -> list[int]:
    """The output_padding with which a transposed convolution of ``input_size`` produces
    ``output_size_`` (how the gradient ops recover it from their tensors' sizes)."""
    return [o - output_size(i, k, s, p, d, 0)
            for i, o, k, s, p, d in zip(input_size, output_size_, kernel_size, stride, padding, dilation)]


# ---------------------------------------------------------------- the input gradient


class InputGradient:
    """A class of input-gradient calls, prepared: ``self(grad_y, w)`` is grad_input, the
    strided convolution of ``grad_y`` by ``w`` (read as it is given where ``as_given``,
    else packed with its input channels innermost), laid out as aten lays out that
    convolution's output; ``repeat``: the kernels' prepared launches, or ``None`` where
    aten computes the class (``arguments``: the op's after the two tensors)."""

    __slots__ = ("epoch", "shape", "strides", "repeat", "as_given", "arguments")

    def __init__(self, shape, strides, repeat, as_given: bool, arguments: tuple):
        self.epoch = EPOCH[0]
        self.shape, self.strides, self.repeat = shape, strides, repeat
        self.as_given, self.arguments = as_given, arguments

    def __call__(self, grad_y, w) -> torch.Tensor:
        if self.repeat is None:
            return _aten_input_grad(grad_y, w, *self.arguments)
        out = grad_y.new_empty_strided(self.shape, self.strides)
        if POISON:
            out.fill_(POISON[-1])
        self.repeat(out, grad_y, w if self.as_given else PACKED.get(w, 0), None, None)
        return out


INPUT_GRADIENTS: dict = {}


def input_grad(grad_output, weight, input_size, stride, padding, dilation, groups, as_given: bool = False):
    """grad_input of a transposed convolution whose (batched) input had spatial size
    ``input_size``: the strided convolution ``conv(grad_output, weight)`` (the weight,
    ``[C_in, C_out/g, *k]``, is already a convolution weight mapping C_out to C_in
    channels), computed without any inserted zero; the op's implementation.
    ``as_given``: read the weight as it is (a recorded forward's backward passes the
    weight as the forward read it) rather than packed for this gradient."""
    arguments = (_hashable(input_size), _hashable(stride), _hashable(padding), _hashable(dilation), groups)
    key = (grad_output.shape, grad_output.stride(), grad_output.dtype, grad_output.device, weight.shape,
           weight.stride(), arguments, as_given, *_settings(grad_output.dtype))
    prepared = _kept(INPUT_GRADIENTS, key)
    if prepared is not None:
        return prepared(grad_output, weight)
    shape = (grad_output.shape[0], weight.shape[0], *input_size)
    out = empty_in_format(shape, grad_output, output_memory_format(grad_output, weight))
    if out.numel() == 0:
        return out
    if weight.numel() == 0:  # (no output channels, on CUDA: every input reached nothing)
        return out.zero_()
    made = {}

    def kernels() -> torch.Tensor:
        made["repeat"] = phase_gemm(out, grad_output, weight if as_given else PACKED.get(weight, 0), None, arguments[1],
                                    arguments[2], arguments[3], groups, transposed=False,
                                    allow_tf32=allow_tf32(grad_output.dtype))
        return out

    def aten() -> torch.Tensor:
        return out.copy_(_aten_input_grad(grad_output, weight, *arguments))

    ours, result = computed("conv_transpose_input_grad", grad_output.device, kernels, aten, key)
    if not ours or made.get("repeat") is not None:
        _keep(INPUT_GRADIENTS, key, InputGradient(out.shape, out.stride(), made.get("repeat") if ours else None,
                                                  as_given, arguments))
    return result


def _aten_input_grad(grad_output, weight, input_size, stride, padding, dilation, groups) -> torch.Tensor:
    """The input gradient through aten's convolution, laid out as the kernels lay out theirs."""
    full = torch.convolution(grad_output, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)
    return as_aten_would(full[(..., *(slice(0, i) for i in input_size))], grad_output, weight)


# ---------------------------------------------------------------- the weight gradient


class WeightGradient:
    """A class of weight-gradient calls, prepared: ``self(x, grad_y)`` is ``(grad_w,
    grad_b)`` (``grad_b`` where the class asks for the bias's too, else None);
    ``repeat``: the kernels' prepared launches, or ``None`` where aten computes the class
    (``arguments``: the op's after the two tensors)."""

    __slots__ = ("epoch", "repeat", "bias", "arguments")

    def __init__(self, repeat, bias: bool, arguments: tuple):
        self.epoch, self.repeat, self.bias, self.arguments = EPOCH[0], repeat, bias, arguments

    def __call__(self, x, grad_y) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.repeat is None:
            return _aten_weight_grad(x, grad_y, *self.arguments), _bias_grad(grad_y) if self.bias else None
        return self.repeat(x, grad_y)


WEIGHT_GRADIENTS: dict = {}


def weight_grad_of(input, grad_output, kernel_size, stride, padding, dilation, groups, bias: bool = False,
                   like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_w, grad_b)`` of a transposed convolution of the (batched) ``input`` that
    produced ``grad_output``'s shape: grad_w ``[C_in, C_out/g, *kernel_size]``, laid out
    as ``like`` (the weight: so that it becomes the weight's ``.grad`` without a copy)
    where that is a contiguous or channels-last layout, else contiguous; with ``bias``,
    grad_b, the sum of ``grad_output`` over all but its channels, from the same launch.
    The weight-gradient op's implementation is its first."""
    c_in, c_out_g = input.shape[1], grad_output.shape[1] // groups
    if c_out_g == 0:  # (no output channels, on CUDA: an empty gradient)
        return input.new_empty((c_in, 0, *kernel_size)), _bias_grad(grad_output) if bias else None
    layout = None if like is None else _dense_layout(like)
    arguments = (_hashable(kernel_size), _hashable(stride), _hashable(padding), _hashable(dilation), groups)
    key = (input.shape, input.stride(), grad_output.shape, grad_output.stride(), input.dtype, input.device, arguments,
           bias, layout, *_settings(input.dtype))
    prepared = _kept(WEIGHT_GRADIENTS, key)
    if prepared is not None:
        return prepared(input, grad_output)
    made = {}

    def aten():
        return _aten_weight_grad(input, grad_output, *arguments), _bias_grad(grad_output) if bias else None

    def kernels():
        grad_w, grad_b, made["repeat"] = weight_grad(input, grad_output, *arguments[:4], groups,
                                                     allow_tf32=allow_tf32(input.dtype), bias=bias, layout=layout)
        return grad_w, grad_b

    ours, result = computed("conv_transpose_weight_grad", input.device, kernels, aten, key)
    if not ours or made.get("repeat") is not None:
        _keep(WEIGHT_GRADIENTS, key, WeightGradient(made.get("repeat") if ours else None, bias, arguments))
    return result


def _dense_layout(weight: torch.Tensor) -> tuple | None:
    """``weight``'s strides where it is laid out contiguous or channels-last (dense: a
    gradient laid out so is a parameter's ``.grad`` as it is), else None."""
    if weight.is_contiguous():
        return None
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if weight.dim() in formats and weight.is_contiguous(memory_format=formats[weight.dim()]):
        return weight.stride()
    return None


def _bias_grad(grad_output: torch.Tensor) -> torch.Tensor:
    return grad_output.sum(dim=[0, *range(2, grad_output.dim())])


def _aten_weight_grad(input, grad_output, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """The weight gradient through aten's convolution backward, contiguous."""
    output_padding = transposed_output_padding(input.shape[2:], grad_output.shape[2:], kernel_size, stride, padding,
                                               dilation)
    weight = input.new_empty((input.shape[1], grad_output.shape[1] // groups, *kernel_size))
    return torch.ops.aten.convolution_backward(
        grad_output, input, weight, None, stride, padding, dilation, True, output_padding, groups, [False, True, False]
    )[1].contiguous()
