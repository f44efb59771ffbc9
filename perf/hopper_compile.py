"""Compile for Hopper (or ``--target`` 80 or 100: Ampere, Blackwell), without a GPU,
every kernel configuration a first call compiles (the cost model's best 6 per key;
``--per-key N``: the best N, 0 for all), and report what each one costs the chip.

    python perf/hopper_compile.py           # the benchmark suites' layers -> suites.{csv,md}
    python perf/hopper_compile.py --api     # every kernel variant the API can launch -> api.{csv,md}
    python perf/hopper_compile.py --api --only depthwise,"output channel"   # the API variants named so
                                            # -> api-only.{csv,md} (a change that adds launches)
    python perf/hopper_compile.py --quick   # two small layers, both paths, and their weight and bias
                                            # gradients (a test runs this)
    python perf/hopper_compile.py --api --target 80    # the same for an A100 (sm_80)
    python perf/hopper_compile.py --reuse old.csv phase_gemm,channels_last   # those kernels' launches from an
                                            # earlier report (same Triton, same target) where it holds them

Nothing runs on a device.  The ops are called on CPU tensors with the Triton launches
intercepted, so every launch's arguments are exactly those of a GPU run of the same
layer (dtypes, layouts, and the integer values Triton specialises on: 1, and multiples
of 16); pruning and ranking are the target GPU's (``TARGETS``).  Each distinct launch is
then compiled by Triton for that target (default sm_90), and read:

* ``regs``, ``local_bytes``: registers per thread and local memory per thread (spills;
  anything above 0 is slow), from ``cuobjdump --dump-resource-usage`` of the cubin;
* ``shared_bytes``: the launch's shared memory (must fit a block of the target: 227 KiB
  on an H100 or a B200, 163 KiB on an A100);
* ``wgmma``, ``mma_sync``, ``tcgen05``: tensor-core instructions in the PTX: Hopper's
  warpgroup MMA, the older ``mma.sync`` (Ampere's, and Hopper's fallback, slower there),
  Blackwell's ``tcgen05.mma``;
* ``async_copies``: ``cp.async`` instructions (global loads software-pipelined through
  shared memory over ``num_stages``);
* ``tma``: tensor-memory-accelerator loads (``cp.async.bulk.tensor``), in the
  experimental variant (``TRITONDECONV_EXPERIMENTAL=tma`` puts it among the candidates);
* ``loop_divisions``: integer divisions and remainders inside the PTX's loops (a runtime
  division is a long instruction sequence; the reduction loops should have none);
* ``scalar_loads``, ``vector_loads``, ``vector_stores``: global loads of one element of
  the launch's dtype each; loads of 8 bytes or more at once (``ld.global.v*``,
  ``cp.async`` of 8 or 16 bytes, TMA); stores of a vector (``st.global.v*``);
* ``wgmma_in_flight``: the most warpgroup MMAs the code lets run while it issues the
  next (``wgmma.wait_group N``'s largest ``N``): 0 is a synchronous MMA, which waits for
  its operands' loads every step; 1 or more, MMAs overlapped with the loads;
* ``specialised``: what Triton specialised beyond the constants: the arguments it saw
  divisible by 16 and those passed in 64 bits (two launches of the same constants can
  differ there, and so compile differently).

Writes a CSV (every launch) and a markdown summary (per tile) to ``--out`` (default
``perf/results/static-sm<target>/triton-<version>``) and exits non-zero if any
configuration fails to compile or does not fit a block of the target.  Spills are reported, not failed: they
depend on the Triton version (``perf/NOTES.md``) and cost time, not correctness.  A
static report: it predicts no time.
"""
from __future__ import annotations

import common  # noqa: I001 (first: the compiler's kernels must be defined before tritondeconv is imported)

common.use_compiler()

import argparse  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from bench import DTYPES, FUNCTIONS, LAYOUTS, SUITES, Cell  # noqa: E402
from common import TYPES, Launch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import tritondeconv  # noqa: E402
import tritondeconv.registrations  # noqa: E402
from tritondeconv.kernels import grouped, launcher, phase_gemm, staging, tuning, weight_grad  # noqa: E402
from tritondeconv.kernels.activations import ACTIVATIONS  # noqa: E402

# Per compute capability, the GPU that stands for it when pruning, ranking and checking
# that a launch fits a block (shared memory per block, SMs).
TARGETS = {80: launcher.DeviceInfo("NVIDIA A100-SXM4-80GB", shared_memory=166912, sms=108, capability=(8, 0)),
           90: launcher.H100,
           100: launcher.DeviceInfo("NVIDIA B200", shared_memory=232448, sms=148, capability=(10, 0))}
ARCHITECTURES = {80: "Ampere", 90: "Hopper", 100: "Blackwell"}
REGISTERS_PER_SM = 65536
KERNELS = {"_phase_gemm_kernel": phase_gemm, "_weight_grad_kernel": weight_grad, "_sum_splits_kernel": weight_grad,
           "_channels_last_kernel": staging, "_grouped_kernel": grouped}  # kernel -> its module
# The API variants' dtypes, each with whether PyTorch's TF32 switch is on.
API_DTYPES = [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False),
              (torch.float64, False)]


# The quick run: small layers that between them reach both paths (tensor cores, FMA for
# few channels) in both directions and the weight gradient, with rows enough for a
# warpgroup-sized (64-row) tensor-core tile, and the forward's one-GEMM variant (k = s).
QUICK = [Cell("quick-wide", 1, 64, (8, 8), 64, 4, 2, 1), Cell("quick-rgb", 2, 32, (6, 6), 3, 2, 2, 0)]


@contextmanager
def recording(launches: set, int64: bool = False, per_key: int | None = None, target: int = 90):
    """While inside: every launch's candidates that a first call compiles on the
    ``target`` GPU (``per_key``: the best N, 0 for all; see ``common.recording``) land in
    ``launches``."""
    with common.recording(lambda request, candidates, timed: launches.update(launch for launch, _ in timed),
                          per_key, int64, TARGETS[target]):
        yield


def _forward_backward(function, x_shape, w_shape, dtype, layout="nchw", backward=True, **kwargs) -> None:
    """``function(x, w, bias, **kwargs)`` on new tensors of these shapes, then its
    gradients for ``x`` and ``w`` (values are never written: only the calls matter)."""
    x = torch.empty(x_shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])
    w = torch.empty(w_shape, dtype=dtype)
    c_out = w_shape[0] if function is tritondeconv.upsample_conv2d else w_shape[1] * kwargs.get("groups", 1)
    b = torch.empty(c_out, dtype=dtype)
    if "residual" in kwargs:  # shaped like the output
        kwargs["residual"] = torch.empty_like(function(x, w, b, **{k: v for k, v in kwargs.items() if k != "residual"}))
    if not backward:
        function(x, w, b, **kwargs)
        return
    x.requires_grad_()
    w.requires_grad_()
    y = function(x, w, b, **kwargs)
    torch.autograd.grad(y, (x, w), torch.empty_like(y))


def _weight_and_bias(x_shape, kernel_size, c_out, dtype, layout="nchw", stride=1, padding=0, output_padding=0,
                     groups=1) -> None:
    """The weight gradient with the bias gradient (``weight_grad``'s ``bias=True``, which
    the op layer does not ask for yet) of a transposed convolution of an input of
    ``x_shape`` to ``c_out`` channels, the geometry the same along every axis; the
    output gradient laid out like the input."""
    from tritondeconv.kernels.planner import output_size

    rank = len(x_shape) - 2
    gy_shape = (x_shape[0], c_out, *(output_size(i, kernel_size, stride, padding, 1, output_padding)
                                     for i in x_shape[2:]))
    x, gy = torch.empty(x_shape, dtype=dtype), torch.empty(gy_shape, dtype=dtype)
    if layout == "channels_last":
        x, gy = (t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()])
                 for t in (x, gy))
    weight_grad.weight_grad(x, gy, (kernel_size,) * rank, (stride,) * rank, (padding,) * rank, (1,) * rank, groups,
                            allow_tf32=torch.backends.cudnn.allow_tf32 and dtype == torch.float32, bias=True)


def record_bias(cell: Cell, dtype: torch.dtype, layout: str, launches: set, per_key: int = tuning.TIMED,
                target: int = 90) -> None:
    """The launches of one cell's weight and bias gradients computed together."""
    with recording(launches, per_key=per_key, target=target):
        _weight_and_bias((cell.n, cell.c_in, *cell.spatial), cell.k, cell.c_out, dtype, layout, cell.s, cell.p,
                         cell.op)


def record(cell: Cell, dtype: torch.dtype, layout: str, launches: set, per_key: int = tuning.TIMED,
           target: int = 90, staged: bool = False) -> None:
    """The launches of one cell's forward and backward (``staged``: each phase GEMM that
    may run on a channels-last copy of its input does)."""
    with recording(launches, per_key=per_key, target=target), _staging(staged):
        _forward_backward(FUNCTIONS[cell.rank][0], (cell.n, cell.c_in, *cell.spatial),
                          (cell.c_in, cell.c_out, *(cell.k,) * cell.rank), dtype, layout,
                          stride=cell.s, padding=cell.p, output_padding=cell.op)


def _staging(staged: bool):
    """While inside: the phase GEMMs that race a channels-last copy of their input take
    it (``staged``), or do not (the default run)."""
    return launcher.intercept(only=(("staged", True),)) if staged else nullcontext()


def api_variants() -> dict[str, tuple[Callable[[torch.dtype], None], bool]]:
    """Every kernel variant the public API can launch, each from one small call, forward
    and backward: name -> (call taking the dtype, whether it indexes in 64 bits)."""
    ct1, ct2, ct3 = (FUNCTIONS[r][0] for r in (1, 2, 3))
    variants = {
        "2-D nchw": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 3, 3), dt, stride=2, padding=1,
                                                   output_padding=1), False),
        "2-D channels_last": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 3, 3), dt, "channels_last",
                                                            stride=2, padding=1, output_padding=1), False),
        "2-D groups 2, dilation 2": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 16, 3, 3), dt, stride=2,
                                                                   groups=2, dilation=2), False),
        "2-D depthwise": (lambda dt: _forward_backward(ct2, (2, 8, 6, 6), (8, 1, 4, 4), dt, stride=2, padding=1,
                                                        groups=8), False),
        # Few channels per group on channels-last input: the groups side by side (the race's
        # default there), 64 groups as a decoder's depthwise layer has them.
        "2-D depthwise, channels_last": (lambda dt: _forward_backward(
            ct2, (2, 64, 6, 6), (64, 1, 4, 4), dt, "channels_last", stride=2, padding=1, groups=64), False),
        "2-D groups of 4 into 2, channels_last": (lambda dt: _forward_backward(
            ct2, (2, 64, 6, 6), (64, 2, 3, 3), dt, "channels_last", stride=2, padding=1, output_padding=1,
            groups=16), False),
        "3-D depthwise, channels_last": (lambda dt: _forward_backward(
            ct3, (1, 32, 4, 4, 4), (32, 1, 3, 3, 3), dt, "channels_last", stride=2, padding=1, output_padding=1,
            groups=32), False),
        "2-D 3 output channels": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 3, 4, 4), dt, stride=2,
                                                                padding=1), False),
        # One output channel from a 9×9 kernel at stride 3 (an SR network's output layer):
        # the phases side by side as columns are among its candidates.
        "2-D 1 output channel k9 s3": (lambda dt: _forward_backward(ct2, (2, 56, 6, 6), (56, 1, 9, 9), dt, stride=3,
                                                                     padding=4, output_padding=2), False),
        "2-D 1 output channel k9 s3, channels_last": (lambda dt: _forward_backward(
            ct2, (2, 56, 6, 6), (56, 1, 9, 9), dt, "channels_last", stride=3, padding=4, output_padding=2), False),
        "1-D": (lambda dt: _forward_backward(ct1, (2, 32, 16), (32, 16, 16), dt, stride=8, padding=4), False),
        "3-D": (lambda dt: _forward_backward(ct3, (1, 16, 4, 4, 4), (16, 16, 3, 3, 3), dt, "channels_last",
                                              stride=2, padding=1, output_padding=1), False),
        "upsample_conv2d": (lambda dt: _forward_backward(tritondeconv.upsample_conv2d, (2, 32, 6, 6), (16, 32, 3, 3),
                                                          dt, padding=1), False),
        "naive": (lambda dt: _forward_backward(tritondeconv.naive_conv_transpose2d, (2, 32, 6, 6), (32, 32, 4, 4), dt,
                                                backward=False, stride=2, padding=1), False),
        "2-D, 64-bit indices": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 4, 4), dt, stride=2,
                                                              padding=1), True),
        # Enough pixels that the weight gradient splits its reduction: the split sum runs.
        "2-D, weight gradient in pixel ranges": (
            lambda dt: _forward_backward(ct2, (2, 32, 64, 64), (32, 32, 4, 4), dt, "channels_last",
                                         stride=2, padding=1),
            False),
    }
    # Kernel size = stride: the forward's one-GEMM variant is a candidate beside the phases.
    for layout in ("nchw", "channels_last"):
        variants[f"2-D k2 s2 {layout}"] = (
            lambda dt, layout=layout: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 2, 2), dt, layout, stride=2),
            False)
    variants.update({
        "2-D k2 s2, 3 output channels": (
            lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 3, 2, 2), dt, stride=2), False),
        "3-D k2 s2": (lambda dt: _forward_backward(ct3, (1, 16, 4, 4, 4), (16, 16, 2, 2, 2), dt, "channels_last",
                                                    stride=2), False),
        "2-D k2 s2, 64-bit indices": (lambda dt: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 2, 2), dt, stride=2),
                                      True),
    })
    # The weight gradient with the bias gradient in the same launch, as the op layer will ask
    # for it (its bias programs beside the GEMM's).
    variants.update({
        "2-D weight and bias gradients, channels_last": (lambda dt: _weight_and_bias(
            (2, 32, 6, 6), 4, 32, dt, "channels_last", stride=2, padding=1), False),
        "2-D weight and bias gradients, nchw, groups 2": (lambda dt: _weight_and_bias(
            (2, 32, 6, 6), 3, 32, dt, stride=2, padding=1, output_padding=1, groups=2), False),
        "2-D weight and bias gradients, 3 output channels": (lambda dt: _weight_and_bias(
            (2, 32, 6, 6), 4, 3, dt, "channels_last", stride=2, padding=1), False),
        "1-D weight and bias gradients": (lambda dt: _weight_and_bias((2, 32, 16), 16, 16, dt, stride=8, padding=4),
                                          False),
        "3-D weight and bias gradients": (lambda dt: _weight_and_bias(
            (1, 16, 4, 4, 4), 3, 16, dt, "channels_last", stride=2, padding=1, output_padding=1), False),
        "2-D weight and bias gradients in pixel ranges": (lambda dt: _weight_and_bias(
            (2, 32, 64, 64), 4, 32, dt, "channels_last", stride=2, padding=1), False),
        "2-D weight and bias gradients, 64-bit indices": (lambda dt: _weight_and_bias(
            (2, 32, 6, 6), 4, 32, dt, "channels_last", stride=2, padding=1), True),
    })
    # NCHW (and 1-D) input on a channels-last copy (the race's other run).
    for name in ("2-D nchw", "1-D", "2-D, 64-bit indices", "2-D k2 s2 nchw"):
        call, int64 = variants[name]
        variants[f"{name}, staged"] = (lambda dt, call=call: _staged(call, dt), int64)
    variants["3-D nchw, staged"] = (lambda dt: _staged(lambda dt: _forward_backward(
        ct3, (1, 16, 4, 4, 4), (16, 16, 3, 3, 3), dt, stride=2, padding=1, output_padding=1), dt), False)
    for activation in ACTIVATIONS:
        variants[f"2-D {activation} + residual"] = (
            lambda dt, a=activation: _forward_backward(ct2, (2, 32, 6, 6), (32, 32, 4, 4), dt, "channels_last",
                                                       stride=2, padding=1, activation=a, residual=True), False)
    return variants


def _staged(call: Callable[[torch.dtype], None], dtype: torch.dtype) -> None:
    with _staging(True):
        call(dtype)


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _mode(constants: dict) -> str:
    """The launch's variant in a few words: direction, dot precision, index width."""
    words = [] if "TRANSPOSED" not in constants else ["transposed" if constants["TRANSPOSED"] else "direct"]
    words += ["one-gemm"] * bool(constants.get("ONE_GEMM")) + ["tma"] * bool(constants.get("TMA_W"))
    words += ["phase-columns"] * bool(constants.get("PHASE_COLUMNS"))
    words += ["tf32"] * (constants.get("INPUT_PRECISION") == "tf32") + ["int64"] * constants.get("INT64_INDEX", False)
    return " ".join(words)


_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_INTEGER_DIVISION = re.compile(r"\b(?:div|rem)\.[su](?:32|64)\b")


def loop_divisions(ptx: str) -> int:
    """Integer divisions and remainders (``div``/``rem`` on 32- or 64-bit integers) in the
    PTX's loops: each line between a label and a later branch back to it counts once."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [_LABEL.match(line)] if m}
    in_loop = set()
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), i + 1) < i:
            in_loop.update(range(labels[m.group(1)], i))
    return sum(bool(_INTEGER_DIVISION.search(lines[i])) for i in in_loop)


_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.(v\d\.)?[bfsu](\d+)\b")
_STORE = re.compile(r"\bst\.global(?:\.[\w:]+)*?\.v\d\.")
_ASYNC_COPY = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global[^;]*,\s*(0x[0-9a-f]+|\d+)")
_WGMMA_WAIT = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)")


def memory_instructions(ptx: str, element_bits: int) -> dict:
    """The PTX's global loads of one ``element_bits``-bit element, loads of 8 bytes or
    more, vector stores, and the largest number of warpgroup MMAs left in flight."""
    loads = [(int(vector[1:-1] or 1) * int(bits), not vector and int(bits) == element_bits)
             for vector, bits in _LOAD.findall(ptx)]
    scalar = sum(one for _, one in loads)
    wide = sum(bits >= 64 and not one for bits, one in loads)
    wide += sum(int(size, 0) >= 8 for size in _ASYNC_COPY.findall(ptx))
    wide += len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    return dict(scalar_loads=scalar, vector_loads=wide, vector_stores=len(_STORE.findall(ptx)),
                wgmma_in_flight=max(map(int, _WGMMA_WAIT.findall(ptx)), default=0))


def _described(launch: Launch) -> dict:
    """A launch's row before compiling: kernel, tile, dtype (the first tensor's), variant
    in words, its constants, and the rest of what Triton specialised (the arguments it
    saw divisible by 16, those it passes in 64 bits): together, what tells one launch
    from another."""
    names = [name for name, _ in launch.signature]
    wide = [name for name, kind in launch.signature if kind == "i64"]
    return dict(kernel=launch.kernel.strip("_").removesuffix("_kernel"), tile=launch.tile,
                dtype=launch.signature[0][1][1:], mode=_mode(dict(launch.constants)),
                constants=" ".join(f"{k}={v}" for k, v in launch.constants),
                specialised=f"div16={','.join(names[i] for i in launch.divisible)} i64={','.join(wide)}")


_COUNTS = ("regs", "local_bytes", "shared_bytes", "wgmma", "mma_sync", "tcgen05", "async_copies", "tma",
           "loop_divisions", "scalar_loads", "vector_loads", "vector_stores", "wgmma_in_flight")


_KEY = ("kernel", "dtype", "mode", "tile", "constants", "specialised")


def reused(csv_path: Path, kernels: set[str], launches) -> dict:
    """Per launch of ``launches`` (of the kernels in ``kernels``), its row in an earlier
    report (``csv_path``, written by this script with the same Triton and target), for
    regenerating a report after a change to other kernels only.  A report written before
    the ``specialised`` column tells launches apart by the rest of the row alone: a
    launch is taken from it only where that rest names as many launches on both sides
    and the earlier report's rows of them are alike (the same figures, whichever is whose)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kernel"] in kernels]
    for r in rows:
        r.update({k: int(r[k]) for k in _COUNTS if r[k] != ""}, fits=r["fits"] == "True")
    key = _KEY if rows and "specialised" in rows[0] else _KEY[:-1]
    described = {launch: tuple(_described(launch)[k] for k in key) for launch in launches}
    old: dict[tuple, list] = {}
    new: dict[tuple, int] = {}
    for r in rows:
        old.setdefault(tuple(r[k] for k in key), []).append(r)
    for k in described.values():
        new[k] = new.get(k, 0) + 1
    def alike(rows: list) -> bool:
        return len({tuple(r[c] for c in (*_COUNTS, "fits", "error")) for r in rows}) == 1

    return {launch: dict(old[k][0], **_described(launch)) for launch, k in described.items()
            if len(old.get(k, ())) == new[k] and alike(old[k])}


def compile_launch(launch: Launch, target: int = 90) -> dict:
    """Compile one launch for ``sm_<target>`` and read its resources."""
    kernel = vars(KERNELS[launch.kernel])[launch.kernel]
    source = ASTSource(kernel, dict(launch.signature), dict(launch.constants),
                       {(i,): [["tt.divisibility", 16]] for i in launch.divisible})
    row = _described(launch)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", target, 32), options=dict(launch.options))
    except Exception as error:  # noqa: BLE001  (every failure is a row of the report)
        where = str(error).splitlines()[0] if str(error) else ""
        return row | dict(error=f"{type(error).__name__} {where} {error.__cause__!r}".strip())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                               check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    threads = dict(launch.options)["num_warps"] * 32
    row.update(regs=int(fields["REG"]), local_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
               shared_bytes=compiled.metadata.shared + int(fields["SHARED"]),
               wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
               tcgen05=len(re.findall(r"tcgen05\.mma", ptx)), tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
               async_copies=len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)), loop_divisions=loop_divisions(ptx),
               **memory_instructions(ptx, int(re.sub(r"\D", "", row["dtype"]) or 8)), error="")
    row["fits"] = row["shared_bytes"] <= TARGETS[target].shared_memory and row["regs"] * threads <= REGISTERS_PER_SM
    return row


# The tensor-core instruction each target's fast path issues (a CSV column).
NATIVE_MMA = {80: "mma_sync", 90: "wgmma", 100: "tcgen05"}


def report(rows: list[dict], cells: dict, out: Path, stem: str, target: int = 90) -> list[dict]:
    """Write the CSV and the markdown summary; return the rows that fail (do not compile,
    or do not fit)."""
    columns = ["kernel", "dtype", "mode", "tile", "regs", "local_bytes", "shared_bytes", "fits", "wgmma",
               "mma_sync", "tcgen05", "async_copies", "tma", "loop_divisions", "scalar_loads", "vector_loads",
               "vector_stores", "wgmma_in_flight", "error", "cells", "constants", "specialised"]
    native, gpu = NATIVE_MMA[target], TARGETS[target].name.removeprefix("NVIDIA ").split()[0]
    for r in rows:
        r["cells"] = "; ".join(sorted(cells[r["key"]]))
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["mode"], r["tile"], r["constants"]))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    bad = [r for r in rows if r["error"] or not r["fits"]]
    ok = [r for r in rows if not r["error"]]
    dot = [r for r in ok if r["wgmma"] + r["mma_sync"] + r["tcgen05"] > 0]
    contiguous = [r for r in ok if "sxc=1" in r["constants"].split()]
    strided = [r for r in ok if "sxc=1" not in r["constants"].split()]
    one = [r for r in ok if "one-gemm" in r["mode"]]
    columns = [r for r in ok if "phase-columns" in r["mode"]]
    gemms = [r for r in ok if r["kernel"] == "phase_gemm"]
    gathered = [r for r in gemms if "sxc=1" not in r["constants"].split()]
    staged = [r for r in gemms if "sxc=1" in r["constants"].split()
              and any("staged" in label.replace(",", " ").split() for label in cells[r["key"]])]
    copies = [r for r in ok if r["kernel"] == "channels_last"]
    weights = [r for r in ok if r["kernel"] == "weight_grad"]
    weights_contiguous = [r for r in weights if {"sxc=1", "syc=1"} <= set(r["constants"].split())]
    side_by_side = [r for r in ok if r["kernel"] == "grouped"]

    def loads(group: list[dict]) -> str:
        tc = [r for r in group if r[native] > 0]
        in_flight = (f"tensor-core launches with MMAs in flight: {sum(r['wgmma_in_flight'] > 0 for r in tc)} of "
                     f"{len(tc)}; " if native == "wgmma" else "")  # (only Hopper's MMA is asynchronous)
        return (f"{len(group)} launches, with scalar loads: {sum(r['scalar_loads'] > 0 for r in group)}, with vector "
                f"loads: {sum(r['vector_loads'] > 0 for r in group)}, with cp.async: "
                f"{sum(r['async_copies'] > 0 for r in group)}; {in_flight}spilling: "
                f"{sum(r['local_bytes'] > 0 for r in group)}")
    tma = [r for r in ok if "tma" in r["mode"].split()]
    lines = [
        f"# {ARCHITECTURES[target]} (sm_{target}) compile report: triton {triton.__version__}, "
        f"torch {torch.__version__}", "",
        f"{len(rows)} distinct launches (kernel, dtype, tile, specialisation) from "
        f"{len({c for v in cells.values() for c in v})} calls (a layer or API variant, a dtype, a layout), forward "
        "and backward; compiled, not run.", "",
        f"- failed to compile: {len(rows) - len(ok)}",
        f"- do not fit a block of the {gpu} (shared memory or registers): {sum(not r['fits'] for r in ok)}",
        f"- spill to local memory: {sum(r['local_bytes'] > 0 for r in ok)} "
        f"(input channels contiguous: {sum(r['local_bytes'] > 0 for r in contiguous)} of {len(contiguous)}; "
        f"strided, as NCHW and 1-D inputs: {sum(r['local_bytes'] > 0 for r in strided)} of {len(strided)})",
        f"- tensor-core launches on {native}: {sum(r[native] > 0 for r in dot)} of {len(dot)}",
        f"- launches with software-pipelined (cp.async) loads: {sum(r['async_copies'] > 0 for r in ok)} of {len(ok)}",
        f"- launches with an integer division or remainder inside a loop: "
        f"{sum(r['loop_divisions'] > 0 for r in ok)} of {len(ok)} (phase GEMM: "
        f"{sum(r['loop_divisions'] > 0 for r in ok if r['kernel'] == 'phase_gemm')} of "
        f"{sum(r['kernel'] == 'phase_gemm' for r in ok)})",
        f"- one-GEMM launches (kernel size = stride): {len(one)}, on {native}: {sum(r[native] > 0 for r in one)}, "
        f"with cp.async: {sum(r['async_copies'] > 0 for r in one)}, spilling: {sum(r['local_bytes'] > 0 for r in one)}",
        f"- phases side by side as columns (fewer than 16 output channels): {len(columns)}, on {native}: "
        f"{sum(r[native] > 0 for r in columns)}, with cp.async: {sum(r['async_copies'] > 0 for r in columns)}, "
        f"spilling: {sum(r['local_bytes'] > 0 for r in columns)}",
        f"- experimental TMA launches (`TRITONDECONV_EXPERIMENTAL=tma`): {len(tma)}, reading through TMA "
        f"(cp.async.bulk.tensor): {sum(r['tma'] > 0 for r in tma)}, on {native}: {sum(r[native] > 0 for r in tma)}, "
        f"spilling: {sum(r['local_bytes'] > 0 for r in tma)}",
        f"- phase GEMM reading strided channels (NCHW and 1-D input as given): {loads(gathered)}",
        f"- phase GEMM on a channels-last copy of NCHW or 1-D input (calls labelled `staged`): {loads(staged)}",
        f"- weight gradient, input and output gradient channels-last: {loads(weights_contiguous)}",
        "- weight gradient, either of them strided (NCHW, 1-D): "
        f"{loads([r for r in weights if r not in weights_contiguous])}",
        f"- weight gradient with the bias gradient in the same launch (`HAS_BIAS=True`): "
        f"{loads([r for r in weights if 'HAS_BIAS=True' in r['constants'].split()])}; integer division in a loop: "
        f"{sum(r['loop_divisions'] > 0 for r in weights)} of {len(weights)} weight-gradient launches",
        f"- grouped kernel (few channels per group, the groups side by side, channels-last): "
        f"{loads(side_by_side)}; with vector stores: {sum(r['vector_stores'] > 0 for r in side_by_side)}",
        f"- channels-last copies (staging): {len(copies)}, with vector loads: "
        f"{sum(r['vector_loads'] > 0 for r in copies)}, with vector stores: "
        f"{sum(r['vector_stores'] > 0 for r in copies)}"
        f", spilling: {sum(r['local_bytes'] > 0 for r in copies)}",
        "", "Per tile, its launches (one per direction, layout and set of specialised integer arguments) in one "
        f"row; `{stem}.csv` has every launch, its constants and the calls that make it:", "",
        f"| kernel | dtype | tile | launches | spilling | max local B | max regs | max shared KiB | on {native} "
        "| with cp.async | MMAs in flight | errors |",
        "|" + " --- |" * 12,
    ]
    tiles: dict[tuple, list[dict]] = {}
    for r in rows:
        tiles.setdefault((r["kernel"], r["dtype"], r["tile"]), []).append(r)
    for (kernel, dtype, tile), group in tiles.items():
        built = [r for r in group if not r["error"]]
        most = {k: max((r[k] for r in built), default=0) for k in ("local_bytes", "regs", "shared_bytes")}
        lines.append(f"| {kernel} | {dtype} | {tile} | {len(group)} | {sum(r['local_bytes'] > 0 for r in built)} "
                     f"| {most['local_bytes']} | {most['regs']} | {most['shared_bytes'] / 1024:.0f} "
                     f"| {sum(r[native] > 0 for r in built)} | {sum(r['async_copies'] > 0 for r in built)} "
                     f"| {sum(r['wgmma_in_flight'] > 0 for r in built)} | {len(group) - len(built)} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small layers, bf16 and fp32")
    ap.add_argument("--api", action="store_true",
                    help="instead of the suites: every kernel variant the API can launch, on small layers, in "
                         "every dtype (fp32 with and without TF32)")
    ap.add_argument("--only", metavar="NAMES",
                    help="with --api: only the API variants whose name contains one of these comma-separated "
                         "words; writes api-only.{csv,md}")
    ap.add_argument("--suites", default="2d,1d,3d")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--per-key", type=int, default=tuning.TIMED, metavar="N",
                    help="the best N candidates of each tuning key, as ranked for the target (default: the "
                         f"{tuning.TIMED} a first call compiles; 1: the cost model's pick; 0: every candidate)")
    ap.add_argument("--target", type=int, choices=sorted(TARGETS), default=90,
                    help="the compute capability to compile for (default 90, Hopper)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, help="default: perf/results/static-sm<target>/triton-<version>")
    ap.add_argument("--reuse", nargs=2, metavar=("CSV", "KERNELS"),
                    help="take the launches of KERNELS (comma-separated, as the report names them) from CSV, an "
                         "earlier report of the same Triton and target, where it holds the same launch; compile "
                         "the rest (for a change that leaves those kernels' source as it was)")
    a = ap.parse_args(argv)
    out = a.out or Path(__file__).parent / "results" / f"static-sm{a.target}" / f"triton-{triton.__version__}"
    suite = QUICK if a.quick else [c for s in a.suites.split(",") for c in SUITES[s]]
    dtypes = ["bf16", "fp32"] if a.quick else a.dtypes.split(",")

    cells: dict[Launch, set[str]] = {}

    def add(launches: set, label: str) -> None:
        for launch in launches:
            cells.setdefault(launch, set()).add(label)

    if a.api:
        for name, (call, int64) in api_variants().items():
            if a.only and not any(word in name for word in a.only.split(",")):
                continue
            for dtype, tf32 in API_DTYPES:
                launches: set[Launch] = set()
                torch.backends.cudnn.allow_tf32 = tf32
                with recording(launches, int64, a.per_key, a.target):
                    call(dtype)
                add(launches, f"{name} {TYPES[dtype]}{' tf32' if tf32 else ''}")
        torch.backends.cudnn.allow_tf32 = True
    else:
        for cell in suite:
            for dtype in dtypes:
                for layout in LAYOUTS[cell.rank]:
                    launches = set()
                    record(cell, DTYPES[dtype], layout, launches, a.per_key, a.target)
                    add(launches, f"{cell.label} {dtype} {layout}")
                    if layout == "nchw":  # and on a channels-last copy, where the race offers one
                        launches = set()
                        record(cell, DTYPES[dtype], layout, launches, a.per_key, a.target, staged=True)
                        add(launches, f"{cell.label} {dtype} {layout} staged")
                    if a.quick:  # and the weight gradient with the bias gradient
                        launches = set()
                        record_bias(cell, DTYPES[dtype], layout, launches, a.per_key, a.target)
                        add(launches, f"{cell.label} {dtype} {layout} bias")
    kept = reused(Path(a.reuse[0]), set(a.reuse[1].split(",")), cells) if a.reuse else {}
    rows = [dict(row, key=launch) for launch, row in kept.items()]
    to_compile = [launch for launch in cells if launch not in kept]
    print(f"{len(cells)} distinct launches ({len(kept)} taken from {a.reuse[0] if a.reuse else '-'}); compiling "
          f"{len(to_compile)} for sm_{a.target} with {a.jobs} processes", flush=True)
    with ProcessPoolExecutor(a.jobs) as pool:
        compiled = pool.map(functools.partial(compile_launch, target=a.target), to_compile)
        for i, (launch, row) in enumerate(zip(to_compile, compiled), 1):
            rows.append(row | dict(key=launch))
            status = row["error"] or f"regs {row['regs']}, local {row['local_bytes']} B, shared {row['shared_bytes']} B"
            print(f"[{i}/{len(to_compile)}] {row['kernel']} {row['dtype']} {row['tile']}: {status}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("api-only" if a.only else "api") if a.api else "quick" if a.quick else "suites"
    bad = report(rows, {r["key"]: cells[r["key"]] for r in rows}, out, stem, a.target)
    print(f"wrote {out / stem}.csv and .md; {len(bad)} failing launches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
