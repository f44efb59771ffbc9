"""What the perf scripts share: Triton's compiler kernels rather than its interpreter's,
what Triton's JIT makes of one launch, the record of every launch a call would
compile on an H100, and Triton's JIT compiling for an H100 on a machine without one.

The scripts run as ``python perf/<script>.py`` (which puts this folder on the import
path); a script that reads the compiler's kernels calls ``use_compiler()`` before it
imports tritondeconv.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

OPTIONS = ("num_warps", "num_stages")  # launch options: not kernel arguments
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def use_compiler() -> None:
    """Have Triton define tritondeconv's kernels for its compiler, not its interpreter.
    Triton decides that when a kernel is defined, at tritondeconv's import, so this
    must come first: it raises where tritondeconv was already imported with the
    interpreter's kernels, rather than let the result depend on import order."""
    os.environ["TRITON_INTERPRET"] = "0"
    common = sys.modules.get("tritondeconv.kernels.common")
    if common is not None and common.INTERPRETING:
        raise RuntimeError("perf: tritondeconv was imported with TRITON_INTERPRET=1 before use_compiler(); "
                           "the compiler's kernels are needed (call use_compiler() before importing tritondeconv)")


@dataclass(frozen=True)
class Launch:
    """One launch to compile: the kernel, its signature and constants as Triton would
    specialise them, the launch options, and a readable description of the tile."""

    kernel: str
    signature: tuple
    constants: tuple
    divisible: tuple
    options: tuple

    @property
    def tile(self) -> str:
        c, o = dict(self.constants), dict(self.options)
        blocks = "x".join(str(c[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK", "BLOCK_C", "BLOCK_P") if b in c)
        return f"{blocks} w{o['num_warps']} s{o['num_stages']}"


def specialise(kernel, args: tuple, kwargs: dict) -> Launch:
    """What Triton's JIT makes of one call: pointers typed by dtype, integers equal to 1
    turned into constants, and the pointers and integers divisible by 16 marked so."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    annotated = {p.name: p.annotation_type for p in kernel.params if p.annotation_type}
    signature, constants, divisible = {}, {}, []
    for i, name in enumerate(names):
        v = values[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + TYPES[v.dtype]
            divisible.append(i)  # the caching allocator's blocks are 256-byte aligned
        elif name in constexprs:
            signature[name], constants[name] = "constexpr", v
        elif isinstance(v, float):
            signature[name] = annotated.get(name, "fp32")  # (an unannotated float is an fp32 to the JIT)
        elif v == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(i)
    options = tuple((k, kwargs[k]) for k in OPTIONS)
    return Launch(kernel.__name__, tuple(signature.items()), tuple(constants.items()), tuple(divisible), options)


class _Hopper:
    """What Triton's JIT asks of a driver before it compiles (the device, its stream and
    its target), answered for an sm_90 GPU; nothing here can launch."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


@contextmanager
def hopper_jit():
    """While inside: Triton's JIT compiles for an H100 (sm_90) on this machine, GPU or
    not, so a kernel's ``warmup`` puts exactly what a GPU's first launch would look up
    into Triton's cache (the cache key is the JIT's own)."""
    from triton.runtime import driver

    driver.set_active(_Hopper())
    try:
        yield
    finally:
        driver.set_active(None)  # back to "the machine's own driver, when first asked"


def compile_for_hopper(request, config: dict):
    """One launch (a ``launcher.Request`` and its tile ``config``) compiled by Triton's own
    JIT for an H100 (sm_90) on this machine, as a GPU's first launch compiles it: the
    compiled kernel, its IRs in ``.asm``.  Needs ``use_compiler()``."""
    with hopper_jit():
        return request.kernel.warmup(*request.args, grid=request.grid, **request.constants, **config)


@contextmanager
def recording(on_launch, per_key: int | None = None, int64: bool = False, device=None):
    """While inside: the ops take their Triton path on CPU tensors, as on the GPU
    ``device`` (a ``launcher.DeviceInfo``; default an H100; nothing runs), and each
    launch's best ``per_key`` candidate configurations of each kernel variant, pruned and
    ranked as on that GPU (default ``tuning.TIMED``, the ones a first call compiles:
    ``tuning.first_timed``; 0: all of them), go to
    ``on_launch(request, candidates, timed)``, ``timed`` as ``(Launch, config)`` pairs;
    ``int64``: as if the tensors were past 2**31 elements, indexed in 64 bits.  Nothing is
    timed: where the ops race two ways of computing a result, the default one runs (an
    ``only`` hook selects another)."""
    from tritondeconv.kernels import launcher, tuning
    from tritondeconv.kernels.common import force_int64_index

    per_key = tuning.TIMED if per_key is None else per_key

    def choose(request, candidates):
        timed = tuning.first_timed(candidates, request.variants, per_key) if len(candidates) > 1 else candidates
        on_launch(request, candidates, [(specialise(request.kernel, request.args, {**request.constants, **config}),
                                         config) for config in timed])
        return candidates[0]

    with launcher.intercept(choose=choose, launch=lambda request, config: None, tune=False,
                            device=device or launcher.H100), \
            (force_int64_index() if int64 else nullcontext()):
        yield
