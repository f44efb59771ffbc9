"""How good is the cost model's ranking?  Tune eight suite layers exhaustively (every
candidate timed, forward and both gradients) and report, per tuning key, where the
exhaustive winner sat in the cost model's ranking and how much slower the model's own
pick and the best of the candidates it would time (the best ``tuning.TIMED`` of each
kernel variant) are than the winner.

    python perf/tune_check.py [--budget SECONDS] [--out DIR]     # on a GPU
    python perf/tune_check.py --dry-run --fake-clock 100          # a CPU rehearsal

Writes ``tune_check.csv`` (a row per tuning key, as soon as its layer is done) to
``--out`` (default: ``perf/results/<gpu-name>``).  ``--dry-run`` rehearses the harness
on CPU: the launches are replaced through ``kernels.launcher.intercept`` (nothing is
computed), the GPU is described as an H100, and each candidate's "time" is the cost
model's estimate perturbed by a fixed amount per tile, so that the report has something
to report.
"""
from __future__ import annotations

import os
import sys

import common

DRY = "--dry-run" in sys.argv
if DRY:  # the GPU's candidate lists, from the compiler's kernels (never run), not the interpreter's
    common.use_compiler()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from bench import FUNCTIONS, SUITES, Budget, Cell, CsvSink, gpu_name  # noqa: E402

from tritondeconv.kernels import cost, launcher, tuning  # noqa: E402

H100 = launcher.H100
# Eight layers across the suites' shapes: narrow and wide, small and large images, k = s
# and k != s, 1-D and 3-D.
CELLS = [SUITES["2d"][i] for i in (1, 3, 4, 7, 9, 10)] + [SUITES["1d"][2], SUITES["3d"][1]]
COLUMNS = ["gpu", "cell", "kernel", "key", "candidates", "rank_of_best", "pick_ms", "timed_best_ms", "best_ms",
           "pick_over_best", "timed_over_best"]


def _layer(cell: Cell, device: str, dry: bool) -> None:
    """Forward and backward of one layer, bf16, channels_last where the rank has it."""
    make = torch.empty if dry else torch.randn
    x = make(cell.n, cell.c_in, *cell.spatial, dtype=torch.bfloat16, device=device)
    if cell.rank > 1:
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[cell.rank])
    w = make(cell.c_in, cell.c_out, *(cell.k,) * cell.rank, dtype=torch.bfloat16, device=device)
    x.requires_grad_()
    w.requires_grad_()
    y = FUNCTIONS[cell.rank][0](x, w, None, cell.s, cell.p, cell.op)
    torch.autograd.grad(y, (x, w), torch.ones_like(y) if not dry else torch.empty_like(y))


def rows_of(entries: list[tuning.Tuning], gpu: str, cell: Cell) -> list[dict]:
    """One row per exhaustive tuning: the trials are in the cost model's order."""
    rows = []
    for entry in entries:
        ran = [(i, t.ms) for i, t in enumerate(entry.timings) if math.isfinite(t.ms)]
        if not ran:
            continue
        rank_of_best, best = min(ran, key=lambda r: r[1])
        pick = ran[0][1]
        # What a first call times by default: the best TIMED of each kernel variant.
        first = {id(c) for c in tuning.first_timed([t.config for t in entry.timings], entry.variants)}
        timed_ms = [ms for i, ms in ran if id(entry.timings[i].config) in first]
        timed_best = min(timed_ms) if timed_ms else math.inf
        rows.append(dict(gpu=gpu, cell=cell.label, kernel=entry.kernel, key=" ".join(map(str, entry.key)),
                         candidates=entry.candidates, rank_of_best=rank_of_best, pick_ms=pick, timed_best_ms=timed_best,
                         best_ms=best, pick_over_best=pick / best, timed_over_best=timed_best / best))
    return rows


def _rehearsal():
    """The dry run's seam: launches recorded, not run; a deterministic fake time per tile."""
    last = {}

    def launch(request, config):
        last["request"], last["config"] = request, config

    def clock(run):
        run()
        config, problem = last["config"], last["request"].problem()
        wobble = 1 + 0.5 * (zlib.crc32(repr(sorted(config.items())).encode()) % 8) / 8
        return cost.estimate(config, problem, H100.machine) * wobble / 1e6

    return launcher.intercept(launch=launch, clock=clock, tune=True, device=H100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="rehearse on CPU (see the module docstring)")
    ap.add_argument("--budget", type=float, metavar="SECONDS", help="stop after the layer in progress once spent")
    ap.add_argument("--fake-clock", type=float, metavar="SECONDS",
                    help="rehearsal: the budget counts SECONDS per finished layer instead of the wall clock")
    ap.add_argument("--out", type=Path, help="results folder (default perf/results/<gpu-name>)")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("tune_check: no CUDA GPU here; `--dry-run` rehearses the harness on CPU")
        return 2
    device = "cpu" if a.dry_run else "cuda"
    gpu = f"{H100.name} (rehearsal)" if a.dry_run else gpu_name(device)
    out = a.out or Path(__file__).parent / "results" / gpu.replace(" ", "-")
    sink = CsvSink(out / "tune_check.csv", [], COLUMNS)
    budget = Budget(a.budget, a.fake_clock)
    os.environ["TRITONDECONV_AUTOTUNE"] = "exhaustive"
    with tempfile.TemporaryDirectory(prefix="tritondeconv-tune-check-") as cache:
        os.environ["TRITONDECONV_CACHE_DIR"] = cache  # tune from nothing
        os.environ["TRITONDECONV_SHIPPED_TUNINGS"] = "0"  # (not even from the shipped tunings)
        with _rehearsal() if a.dry_run else contextlib.nullcontext():
            for i, cell in enumerate(CELLS, 1):
                if budget.spent():
                    print(f"budget of {a.budget:g} s spent: stopped after {i - 1} of {len(CELLS)} layers", flush=True)
                    break
                before = len(tuning.tuning_report())
                _layer(cell, device, a.dry_run)
                rows = rows_of(tuning.tuning_report()[before:], gpu, cell)
                for r in rows:
                    sink.write(r)
                print(f"[{i}/{len(CELLS)}] {cell.label}: " + ", ".join(
                    f"{r['kernel']} best at rank {r['rank_of_best']} of {r['candidates']}, "
                    f"pick {r['pick_over_best']:.2f}x, timed best {r['timed_over_best']:.2f}x" for r in rows),
                      flush=True)
                budget.job_done()
    sink.close()
    if sink.rows:
        worst = max(r["timed_over_best"] for r in sink.rows)
        print(f"{len(sink.rows)} keys: the best of those timed ({tuning.TIMED} per kernel variant) "
              f"is at worst {worst:.2f}x the exhaustive best; wrote {sink.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
