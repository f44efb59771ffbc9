"""What a first call's compilations cost on the host, without a GPU: compile, for sm_90,
the candidates the tuner would time for the first keys of a benchmark stage, one after
another and then on a thread pool (as the tuner compiles a key's candidates), each into
an empty Triton cache.

    python perf/compile_time.py [--stage fwd-bf16-cl] [--keys 4] [--threads N]

Prints seconds per compile (median, max) and the wall time of both ways.
"""
from __future__ import annotations

import common  # noqa: I001 (first: the real compiler's kernels)

common.use_compiler()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import triton  # noqa: E402
from candidates import STAGES, launches_of  # noqa: E402
from hopper_compile import KERNELS  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _compile(spec) -> float:
    """Seconds to compile one recorded launch (a ``hopper_compile.Launch``) for sm_90."""
    kernel = vars(KERNELS[spec.kernel])[spec.kernel]
    source = ASTSource(kernel, dict(spec.signature), dict(spec.constants),
                       {(i,): [["tt.divisibility", 16]] for i in spec.divisible})
    start = time.perf_counter()
    triton.compile(source, target=TARGET, options=dict(spec.options))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="fwd-bf16-cl", choices=list(STAGES))
    ap.add_argument("--keys", type=int, default=4, help="how many of the stage's tuning keys")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    keys, compiles = launches_of(a.stage)
    chosen_keys = list(keys)[:a.keys]
    chosen = {(family, key) for family, key, _ in chosen_keys}
    launches = [spec for spec, (request, _) in compiles.items() if (request.family, request.key) in chosen]
    print(f"{a.stage}: {len(chosen_keys)} keys, {len(launches)} distinct compiles, Triton {triton.__version__}, "
          f"{os.cpu_count()} cores", flush=True)
    for threads in (1, a.threads):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                seconds = list(pool.map(_compile, launches))
            wall = time.perf_counter() - start
        print(f"{threads} thread(s): {wall:.1f} s wall; per compile median {statistics.median(seconds):.2f} s, "
              f"max {max(seconds):.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
