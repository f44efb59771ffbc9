"""What first calls would tune in each benchmark stage of ``perf/gpu_check.sh`` on an
H100: tuning keys, candidates per key (offered after pruning, and timed: the cost
model's best ``tuning.TIMED`` of each kernel variant), and the distinct kernels Triton
would compile for them (a compile is per specialisation, so keys that share tiles and
argument properties share compiles); on a GPU, compile them all before the stage runs.

    python perf/candidates.py                        # every bench stage -> a markdown table
    python perf/candidates.py --stages nd            # some of them
    python perf/candidates.py --stages nd --warm     # on a GPU: compile them into Triton's
                                                     # cache on every core, then report

The ops run on CPU tensors (never written or read) with every launch intercepted; the
GPU is described as an H100 (``launcher.H100``), so pruning and ranking are the
GPU's.
"""
from __future__ import annotations

import common  # noqa: I001 (first: the compiler's kernels (their parameters), not the interpreter's)

common.use_compiler()

import argparse  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from bench import DTYPES, FUNCTIONS, VARIANTS, Cell, jobs_of  # noqa: E402

import tritondeconv  # noqa: E402
from tritondeconv.kernels import launcher  # noqa: E402
from tritondeconv.kernels.common import configured  # noqa: E402

# gpu_check.sh's bench stages, as bench.py arguments (and "variants": each kernel variant
# a bench method forces, tuned among its own candidates, and "experimental": the
# TRITONDECONV_EXPERIMENTAL the stage runs with).
STAGES = {
    "fwd-bf16-cl": dict(suites="2d", passes="fwd", dtypes="bf16", layouts="channels_last"),
    "host": dict(suites="small", passes="fwd,fwd+bwd", dtypes="bf16", layouts="channels_last"),
    "fwd-nchw": dict(suites="2d", passes="fwd", dtypes="bf16", layouts="nchw"),
    "train-bf16-cl": dict(suites="2d", passes="fwd+bwd", dtypes="bf16", layouts="channels_last"),
    "grads-bf16-cl": dict(suites="2d", passes="fwd,dgrad,wgrad", dtypes="bf16", layouts="channels_last"),
    "grads-nchw": dict(suites="2d", passes="wgrad,dgrad", dtypes="bf16", layouts="nchw"),
    "nd": dict(suites="1d,3d", passes="fwd,fwd+bwd", dtypes="bf16", layouts="nchw,channels_last"),
    "fwd-fp16-fp32": dict(suites="2d", passes="fwd", dtypes="fp16,fp32", layouts="nchw,channels_last"),
    "variants": dict(suites="2d,3d", passes="fwd", dtypes="bf16", layouts="nchw,channels_last", cells="U-Net",
                     variants=(None, *VARIANTS.values()), experimental="tma"),
    "classes": dict(suites="classes,3d", passes="fwd", dtypes="bf16,fp16,fp32", layouts="nchw,channels_last",
                    variants=(None, *VARIANTS.values()), experimental="phase_columns"),
}


def _run(cell: Cell, dtype: torch.dtype, layout: str, pass_: str) -> None:
    """Ours (and the naive op, for a 2-D forward) on one cell."""
    x = torch.empty(cell.n, cell.c_in, *cell.spatial, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[cell.rank])
    w = torch.empty(cell.c_in, cell.c_out // cell.groups, *(cell.k,) * cell.rank, dtype=dtype)
    b = torch.empty(cell.c_out, dtype=dtype)
    args = (cell.s, cell.p, cell.op, cell.groups)
    ours = FUNCTIONS[cell.rank][0]
    if pass_ == "fwd":  # (any other pass: the backward's two gradients, as fwd+bwd runs them)
        ours(x, w, b, *args)
        if cell.rank == 2 and cell.groups == 1:
            tritondeconv.naive_conv_transpose2d(x, w, b, *args)
        return
    x.requires_grad_()
    w.requires_grad_()
    y = ours(x, w, b, *args)
    torch.autograd.grad(y, (x, w), torch.empty_like(y))


def launches_of(stage: str, cells: str = "") -> tuple[dict, dict]:
    """One stage's first calls (``cells``: only the layers whose labels contain one of
    these comma-separated words): ``{(family, key, forced variant): (offered, timed)}``
    and the distinct
    compiles of the timed candidates, ``{specialisation: (request, config)}``."""
    keys: dict[tuple, tuple[int, int]] = {}
    compiles: dict = {}
    forced = [None]  # the variant the calls in progress force (a key of its own)

    def on_launch(request, candidates, timed):
        keys[(request.family, request.key, forced[0])] = (len(candidates), len(timed))
        for launch, config in timed:
            compiles.setdefault(launch, (request, config))

    spec = dict(STAGES[stage])
    variants = spec.pop("variants", (None,))
    spec["cells"] = cells or spec.get("cells", "")
    experimental = spec.pop("experimental", "")
    # (The settings are read at import: the stage's experimental features are set here as
    # the environment would have set them.)
    with common.recording(on_launch), configured(experimental={experimental} if experimental else None):
        for cell, dtype_name, layout, pass_ in jobs_of(argparse.Namespace(quick=False, **spec)):
            # NCHW input: a first call races the phase GEMM on it and on a channels-last copy.
            for forced[0], staged in itertools.product(variants, (False, True) if layout == "nchw" else (False,)):
                with launcher.intercept(only=(*(forced[0] or ()), *(("staged", True),) * staged) or None):
                    _run(cell, DTYPES[dtype_name], layout, pass_)
    return keys, compiles


def count(stage: str) -> dict:
    """Keys, candidates and distinct compiles of one stage's first calls."""
    keys, compiles = launches_of(stage)
    offered = [o for o, _ in keys.values()]
    timed = [t for _, t in keys.values()]
    return dict(stage=stage, keys=len(keys), offered=sum(offered), timed=sum(timed),
                median_offered=statistics.median(offered), max_offered=max(offered), compiles=len(compiles))


def jit_compile(request, config) -> None:
    """Compile one launch as Triton's JIT would on this GPU (into its cache), running nothing."""
    request.kernel.warmup(*request.args, grid=request.grid, **request.constants, **config)


def warm(stage: str, compile_one=jit_compile, workers: int | None = None,
         cells: str = "") -> tuple[int, int, int, float]:
    """Compile every distinct launch a stage's first calls would time (``cells`` as in
    ``launches_of``), on ``workers`` threads (default: every core); ``(compiled,
    failed, found in Triton's cache, seconds)``.  A later first call then finds its
    candidates in Triton's cache."""
    _, compiles = launches_of(stage, cells)
    hits = []
    listener, triton.knobs.compilation.listener = (triton.knobs.compilation.listener,
                                                   lambda cache_hit, **_: hits.append(cache_hit))
    start = time.perf_counter()

    def one(launch) -> bool:
        try:
            compile_one(*launch)
            return True
        except Exception as error:  # noqa: BLE001 (the tuner will skip it and say why)
            print(f"warm: {launch[0].family} {launch[1]} failed: {type(error).__name__}: {error}", flush=True)
            return False

    try:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            done = list(pool.map(one, compiles.values()))
    finally:
        triton.knobs.compilation.listener = listener
    return sum(done), len(done) - sum(done), sum(hits), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    ap.add_argument("--warm", action="store_true", help="on a GPU: compile every launch into Triton's cache")
    a = ap.parse_args(argv)
    if a.warm:
        if not torch.cuda.is_available():
            print("candidates: --warm compiles for this machine's GPU, and there is none")
            return 2
        for stage in a.stages.split(","):
            compiled, failed, hits, seconds = warm(stage)
            print(f"{stage}: compiled {compiled} kernels ({failed} failed; {hits} found in Triton's cache) in "
                  f"{seconds:.1f} s on {os.cpu_count()} threads", flush=True)
        return 0
    print("| stage | tuning keys | candidates offered (median, max per key) | candidates timed | distinct compiles |")
    print("| --- | --- | --- | --- | --- |")
    for stage in a.stages.split(","):
        r = count(stage)
        print(f"| {r['stage']} | {r['keys']} | {r['offered']} ({r['median_offered']:g}, {r['max_offered']}) "
              f"| {r['timed']} | {r['compiles']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
