"""``torch.nn`` modules backed by the tritondeconv ops."""
from __future__ import annotations

from typing import NoReturn

import torch

from . import dispatch
from .concat import conv_transpose_cat
from .folding import fold_refusal, integer_scale, upsample_conv2d
from .functional import conv_transpose1d, conv_transpose2d, conv_transpose3d
from .weights import PACKED

__all__ = ["ConcatUpsample1d", "ConcatUpsample2d", "ConcatUpsample3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d", "UpsampleConv2d", "clear_weight_cache"]


def _refuse_scripting(module: torch.nn.Module) -> NoReturn:
    """What ``torch.jit.script`` meets first on one of these modules (its
    ``__prepare_scriptable__``): a clear refusal instead of an error from deep inside
    the TorchScript compiler."""
    raise RuntimeError(
        f"torch.jit.script: scripting is not supported for tritondeconv.nn.{type(module).__name__} (its forward is "
        f"Python that TorchScript cannot compile); use torch.jit.trace(model, example_inputs) or torch.compile(model) "
        f"instead"
    )


def _zeros_padding_only(module: torch.nn.Module) -> None:
    """The ``ValueError`` PyTorch's transposed convolutions raise in ``forward`` for a
    ``padding_mode`` other than ``"zeros"`` (set after construction too); an
    ``UpsampleConv2d`` (a ``Conv2d``) refuses it likewise, since only zero padding folds
    into a transposed convolution."""
    if module.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(module).__name__}")


def clear_weight_cache(model: torch.nn.Module) -> int:
    """Forget the packed copies kept of the weights of ``model``'s transposed convolutions
    (needed only after changing a weight through ``.data``, which its version counter does
    not see; see ``tritondeconv.weights``); returns how many weights had one."""
    return sum(PACKED.forget(module.weight) > 0 for module in model.modules()
               if isinstance(module, _TritonForward))


class _TritonForward:
    """``forward(input, output_size=None)`` as PyTorch's transposed convolutions have it,
    computed by tritondeconv, plus the optional epilogue: ``activation=`` (and
    ``negative_slope=``) in the constructor, ``residual=`` in ``forward``.  Mixed into
    subclasses of PyTorch's modules, which keep their constructor (arguments, defaults,
    initialisation), parameter names and shapes, so state dicts load both ways; like
    PyTorch's, they refuse a ``padding_mode`` other than ``"zeros"``.

    Everything these subclasses add lives on the class (attributes set in their
    ``__init__`` have class-level defaults), so that an instance of PyTorch's module
    becomes one of them by a change of class (``tritondeconv.convert``), keeping its
    identity, parameters, buffers and hooks.
    """

    _rank: int  # spatial axes
    _function: staticmethod  # the functional form
    # The epilogue: ``activation`` (and ``negative_slope``) fused into the kernel's store,
    # and ``forward(..., residual=)`` adding a residual there too (see
    # ``tritondeconv.conv_transpose2d``).
    activation: str | None = None
    negative_slope: float = 0.01

    def __init__(self, *args, activation: str | None = None, negative_slope: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation, self.negative_slope = activation, negative_slope

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` first: refuses, saying what to use instead."""
        _refuse_scripting(self)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            _zeros_padding_only(self)
        if output_size is None and type(input) is torch.Tensor:  # (the module's own arguments, already parsed)
            return dispatch.conv_transpose(input, self.weight, self.bias, (self.stride, self.padding,
                                           self.output_padding, self.groups, self.dilation), self.activation,
                                           self.negative_slope, residual)
        output_padding = self.output_padding if output_size is None else self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._rank, self.dilation
        )
        return self._function(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation,
            activation=self.activation, negative_slope=self.negative_slope, residual=residual,
        )

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra


class ConvTranspose1d(_TritonForward, torch.nn.ConvTranspose1d):
    """Drop-in for ``torch.nn.ConvTranspose1d`` (with the optional epilogue of ``_TritonForward``)."""

    _rank, _function = 1, staticmethod(conv_transpose1d)


class ConvTranspose2d(_TritonForward, torch.nn.ConvTranspose2d):
    """Drop-in for ``torch.nn.ConvTranspose2d`` (with the optional epilogue of ``_TritonForward``)."""

    _rank, _function = 2, staticmethod(conv_transpose2d)


class ConvTranspose3d(_TritonForward, torch.nn.ConvTranspose3d):
    """Drop-in for ``torch.nn.ConvTranspose3d`` (with the optional epilogue of ``_TritonForward``)."""

    _rank, _function = 3, staticmethod(conv_transpose3d)


class _ConcatForward:
    """``forward(input, skip, output_size=None)``: ``torch.cat([up(input), skip], dim=1)``
    (the U-Net decoder's upsampling and skip connection), where ``up`` is the transposed
    convolution (with its epilogue) that this module is; the concatenation is allocated
    once and the convolution written straight into it (``tritondeconv.concat``), with its
    own backward.  Otherwise the same module as the transposed convolution: constructor,
    parameters, state dict (so ``convert(model, fuse=True)`` makes one from a traced
    ``torch.cat([up(x), skip], 1)`` by a change of class)."""

    def forward(self, input: torch.Tensor, skip: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        _zeros_padding_only(self)
        output_padding = self.output_padding if output_size is None else self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._rank, self.dilation
        )
        return conv_transpose_cat(input, skip, self.weight, self.bias, self.stride, self.padding, output_padding,
                                  self.groups, self.dilation, activation=self.activation,
                                  negative_slope=self.negative_slope)


class ConcatUpsample1d(_ConcatForward, ConvTranspose1d):
    """``torch.cat([ConvTranspose1d(...)(input), skip], dim=1)`` in one buffer (``_ConcatForward``)."""


class ConcatUpsample2d(_ConcatForward, ConvTranspose2d):
    """``torch.cat([ConvTranspose2d(...)(input), skip], dim=1)`` in one buffer (``_ConcatForward``)."""


class ConcatUpsample3d(_ConcatForward, ConvTranspose3d):
    """``torch.cat([ConvTranspose3d(...)(input), skip], dim=1)`` in one buffer (``_ConcatForward``)."""


CONCAT = {ConvTranspose1d: ConcatUpsample1d, ConvTranspose2d: ConcatUpsample2d, ConvTranspose3d: ConcatUpsample3d}


class UpsampleConv2d(torch.nn.Conv2d):
    """``nn.Upsample(scale_factor, mode="nearest")`` followed by ``nn.Conv2d`` (stride 1,
    zero padding), computed as one stride-phase transposed convolution
    (``tritondeconv.upsample_conv2d``).

    It is a ``Conv2d``: the same weight and bias (names, shapes, initialisation), so a
    checkpoint of the original block's convolution loads into it.  Like the transposed
    convolutions, it adds only class-level behaviour besides ``scale_factor``, so that
    ``convert(model, fold_upsample=True)`` turns a ``Conv2d`` into one by a change of
    class and setting its ``scale_factor``.
    """

    activation: str | None = None
    negative_slope: float = 0.01

    def __init__(self, in_channels, out_channels, kernel_size, scale_factor=2, padding=0, groups=1, bias=True,
                 device=None, dtype=None, *, activation=None, negative_slope=0.01):
        if isinstance(padding, str):
            raise ValueError(  # noqa: TRY004 (as Conv2d raises for a padding string it does not know)
                "UpsampleConv2d: padding must be an int or a pair of ints, not a string")
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, groups=groups, bias=bias,
                         device=device, dtype=dtype)
        self.scale_factor = scale_factor
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_modules(cls, upsample: torch.nn.Upsample, conv: torch.nn.Conv2d) -> UpsampleConv2d:
        """The fold of ``upsample`` (nearest, a whole scale factor) followed by ``conv``
        (stride 1, dilation 1, zero padding of at most ``kernel_size - 1``): a new
        module sharing ``conv``'s weight and bias (the same ``Parameter`` objects, so an
        optimizer of the original keeps training it).  Raises ``ValueError`` saying why
        a pair cannot be folded."""
        if not isinstance(upsample, torch.nn.Upsample) or upsample.mode != "nearest":
            raise ValueError("UpsampleConv2d.from_modules: upsample must be an nn.Upsample with mode='nearest'")
        if not isinstance(conv, torch.nn.Conv2d):
            raise ValueError(  # noqa: TRY004 (from_modules raises ValueError for every pair it cannot fold)
                f"UpsampleConv2d.from_modules: conv must be an nn.Conv2d, but got {type(conv).__name__}")
        why = fold_refusal(upsample, conv, registrations=1)
        if why is not None:
            raise ValueError(f"UpsampleConv2d.from_modules: cannot fold: {why}")
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, integer_scale(upsample), conv.padding,
                     conv.groups, bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)
        folded.weight, folded.bias = conv.weight, conv.bias
        folded.train(conv.training)
        return folded

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _zeros_padding_only(self)
        return upsample_conv2d(input, self.weight, self.bias, self.scale_factor, self.padding, self.groups,
                               activation=self.activation, negative_slope=self.negative_slope, residual=residual)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return f"{super().extra_repr()}, scale_factor={self.scale_factor}{extra}"

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` first: refuses, saying what to use instead."""
        _refuse_scripting(self)
