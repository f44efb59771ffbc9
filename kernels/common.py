"""What every kernel launcher shares: the run mode, the dot-operand choices, and the
launch observers (the documented seam through which tests and tools see which kernels
ran, with which constants)."""
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


# Counts the changes of what decides a launch (``configured``, ``launcher.intercept`` and
# ``launcher.stub_launches`` entered or left, ``launcher.forget_tunings``): what a caller
# prepared for a class of calls holds only in the epoch it was prepared in.
EPOCH = [0]


@dataclass
class Settings:
    """The environment's switches for the kernels, read once, when the package is
    imported (a change of the environment later is not seen; ``configured`` changes
    them for a block):

    * ``experimental`` (``TRITONDECONV_EXPERIMENTAL``, comma-separated): the features
      turned on; ``"tma"``, the phase GEMM reading its input through Hopper's tensor
      memory accelerator, offered to the tuner only then; ``"phase_columns"``, the
      phase GEMM with its phases side by side offered for every transposed layer of
      dilation 1 (not only those of fewer than 16 output channels per group);
    * ``autotune`` (``TRITONDECONV_AUTOTUNE``): ``"0"`` (time nothing: the cost model's
      pick), ``"exhaustive"`` (time every candidate), otherwise ``"1"`` (time the cost
      model's best few; see ``tuning``).
    """
    experimental: frozenset
    autotune: str


def _autotune_mode(value: str) -> str:
    return value if value in ("0", "exhaustive") else "1"


SETTINGS = Settings(frozenset(os.environ.get("TRITONDECONV_EXPERIMENTAL", "").split(",")) - {""},
                    _autotune_mode(os.environ.get("TRITONDECONV_AUTOTUNE", "1")))


@contextlib.contextmanager
def configured(experimental=None, autotune: str | None = None) -> Iterator[None]:
    """``SETTINGS`` changed for the block (``experimental``: an iterable of features;
    ``autotune``: as ``TRITONDECONV_AUTOTUNE``), then restored; a new epoch both ways."""
    before = (SETTINGS.experimental, SETTINGS.autotune)
    if experimental is not None:
        SETTINGS.experimental = frozenset(experimental)
    if autotune is not None:
        SETTINGS.autotune = _autotune_mode(autotune)
    EPOCH[0] += 1
    try:
        yield
    finally:
        SETTINGS.experimental, SETTINGS.autotune = before
        EPOCH[0] += 1


def experimental(feature: str) -> bool:
    """Whether ``feature`` is among ``SETTINGS.experimental``."""
    return feature in SETTINGS.experimental


_OPERAND_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                   torch.float32: tl.float32, torch.float64: tl.float64}


def operand_dtype(dtype: torch.dtype):
    """The dtype tiles are fed to ``tl.dot`` in: the tensors' own, except that the
    interpreter multiplies bf16 as fp32 (numpy has no bf16; products of bf16 values are
    exact in fp32, so the result is the same)."""
    if INTERPRETING and dtype == torch.bfloat16:
        return tl.float32
    return _OPERAND_DTYPES[dtype]


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 when PyTorch's conv would use it."""
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


@triton.jit
def fma_dot(a, b):
    """``sum_k a[m, k] * b[k, n]`` by one FMA per product, in the operands' dtype: the
    FMA tiles' matrix product (fewer than 16 channels on a side).

    The product is written with ``b`` first on purpose.  Triton 3.6 rewrites
    ``sum(a[:, :, None] * b[None, :, :], 1)`` into a TF32 ``tl.dot`` whenever the
    result tile is at least 16 by 16, whatever the reduction's length (its shape check
    reads the left operand twice), and on sm_90 such a dot over 4 channels computed
    wrong results on an H200 (fp32, fp16 and bf16; fp64 is never rewritten).  The
    interpreter cannot see this: the quick sm_90 compile test checks that no FMA tile
    issues a tensor-core instruction."""
    return tl.sum(b[None, :, :] * a[:, :, None], axis=1)


INT64_FORCED: list[bool] = []  # per open ``force_int64_index`` (empty: not forced)


@contextlib.contextmanager
def force_int64_index() -> Iterator[None]:
    """Make every launch in the block index in 64 bits, as it does for tensors past 2**31
    elements (so that path can be tested, and compiled, on small tensors)."""
    INT64_FORCED.append(True)
    EPOCH[0] += 1
    try:
        yield
    finally:
        INT64_FORCED.pop()
        EPOCH[0] += 1


def int64_forced() -> bool:
    """Whether ``force_int64_index`` is in force."""
    return bool(INT64_FORCED)


def spans_int64(shape, strides) -> bool:
    """Whether some element of a tensor of this shape and these strides lies 2**31 or
    more elements from its base (an empty tensor has none)."""
    if 0 in shape:
        return False
    return sum((size - 1) * abs(stride) for size, stride in zip(shape, strides)) >= 2**31 - 1


def padded(layout: tuple, lead: int) -> tuple:
    """A ``(shape, strides)`` of ``[N, C, *spatial]`` with ``lead`` more spatial axes of
    size 1 in front (how the kernels run 1-D and 2-D tensors on their three axes), with
    the strides ``unsqueeze`` gives them (the first spatial axis's extent), so that
    Triton specialises the launch as it would the unsqueezed tensor."""
    shape, strides = layout
    extent = strides[2] * shape[2]
    return (*shape[:2], *(1,) * lead, *shape[2:]), (*strides[:2], *(extent,) * lead, *strides[2:])


_SIMULATED_CAPTURE: list[bool] = []


@contextlib.contextmanager
def simulate_capture() -> Iterator[None]:
    """Make the ops and the tuner behave in the block as during CUDA-graph capture of the
    current stream (so that what they do differently there can be tested without a GPU)."""
    _SIMULATED_CAPTURE.append(True)
    try:
        yield
    finally:
        _SIMULATED_CAPTURE.pop()


def capturing(tensor: torch.Tensor | None = None) -> bool:
    """Whether the current CUDA stream is being captured into a graph (for ``tensor``'s
    work, if given: never for a CPU tensor), or ``simulate_capture`` is in force. Nothing
    can be timed during a capture, and what runs is recorded to replay later."""
    if _SIMULATED_CAPTURE:
        return True
    if tensor is not None:
        return tensor.is_cuda and torch.cuda.is_current_stream_capturing()
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


POISON: list[float] = []  # per open ``poison_allocations``, the value (empty: nothing poisoned)


@contextlib.contextmanager
def poison_allocations(value: float = float("nan")) -> Iterator[None]:
    """While the block runs, every tensor the ops and launchers allocate for a result
    (outputs, gradients, the weight gradient's workspace) starts filled with ``value``,
    so that an element a kernel fails to write shows (tests poison with NaN)."""
    POISON.append(value)
    try:
        yield
    finally:
        POISON.pop()


def allocated(t: torch.Tensor) -> torch.Tensor:
    """``t``, a new result tensor, filled as ``poison_allocations`` asks (if it does)."""
    return t.fill_(POISON[-1]) if POISON else t


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher made it: the kernel family (``"phase_gemm"``,
    ``"weight_grad"``, ``"split_sum"`` or ``"staging"``), the compile-time constants it
    was specialised with (the tile configuration included), and the dtype of the
    tensors it read."""
    kernel: str
    constants: dict
    dtype: torch.dtype | None = None


OBSERVERS: list[list[Launch]] = []  # the open observers' lists (empty: nobody observes)


@contextlib.contextmanager
def observe_launches() -> Iterator[list[Launch]]:
    """Collect every kernel launch made while the block runs (from any thread) into the
    list it yields; the tuner's timing runs are not counted, only the launches that
    compute a result (each run of a ``launcher.race`` computes it, so each is seen).
    Observing costs nothing when nobody observes."""
    launches: list[Launch] = []
    OBSERVERS.append(launches)
    try:
        yield launches
    finally:
        del OBSERVERS[next(i for i, o in enumerate(OBSERVERS) if o is launches)]


def notify_launch(kernel: str, constants: dict, dtype: torch.dtype | None = None, config: dict | None = None) -> None:
    """Called by the launcher after a launch (its compile-time ``constants`` and tile
    ``config``): hands it to every observer."""
    for launches in OBSERVERS:
        launches.append(Launch(kernel, {**constants, **(config or {})}, dtype))
