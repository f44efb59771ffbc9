"""The benchmark harness runs end to end (tiny shapes; on CPU through the interpreter):
it checks every method against float64, writes the CSV and table, and plots them, and
says where the kernels ran."""
import csv
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import tile_sides

PERF = Path(__file__).parent.parent / "perf"
# Where bench.py runs the kernels: on a GPU unless TRITON_INTERPRET=1 asks for the interpreter.
COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def test_bench_quick_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="perf/plot.py needs matplotlib")
    run = subprocess.run(
        [sys.executable, str(PERF / "bench.py"), "--quick", "--layouts", "nchw", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )
    where = "compiled for" if COMPILED else "in the Triton interpreter on CPU tensors"
    assert f"running tritondeconv's kernels {where}" in run.stdout
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("gpu", "rank", "shape", "dtype", "layout", "pass", "method", "median_ms", "tflops", "pct_roofline",
                   "tuning_s"):
        assert column in rows[0]
    assert {r["rank"] for r in rows} == {"1-D", "2-D", "3-D"}
    methods = {(r["pass"], r["method"]) for r in rows}
    assert methods == {("fwd", "tritondeconv"), ("fwd", "cudnn"), ("fwd", "naive"), ("fwd", "subpixel_torch"),
                       ("fwd+bwd", "tritondeconv"), ("fwd+bwd", "cudnn")}
    assert all(float(r["median_ms"]) > 0 and float(r["rel_error"]) < 2e-3 for r in rows)
    assert all(r["gpu"].startswith("cpu-interpreter-") != COMPILED for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert ("tritondeconv's kernels ran in the Triton interpreter" in table) != COMPILED
    assert "Geometric-mean speedup" in table
    assert all(f"{rank}, fwd, over cudnn" in table for rank in ("1-D", "2-D", "3-D"))
    # Runs split over several device calls are merged into one table.
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, str(PERF / "bench.py"), "--merge", str(tmp_path / "bench.csv"),
                    "--out", str(merged)],
                   check=True, capture_output=True, text=True)
    with open(merged / "bench.csv", newline="") as f:
        assert [r["median_ms"] for r in csv.DictReader(f)] == [r["median_ms"] for r in rows]
    assert (merged / "bench.md").read_text().count("|") == table.count("|")
    subprocess.run([sys.executable, str(PERF / "plot.py"), str(tmp_path / "bench.csv")],
                   check=True, capture_output=True)
    for png in ("speedup_cudnn.png", "roofline.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run compiled unless TRITON_INTERPRET=1")
def test_bench_refuses_to_time_the_aten_fallback(tmp_path):
    """On CPU with TRITON_INTERPRET=0, tritondeconv's ops would fall back to aten: the
    harness stops before timing anything rather than label aten's times as ours."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(PERF / "bench.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "CPU tensors would fall back to aten" in run.stderr
    assert not (tmp_path / "bench.csv").exists()


def _bench(tmp_path, *args, **popen):
    """perf/bench.py with ``args``, its temporary files confined to ``tmp_path/tmp``."""
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    env.pop("TRITONDECONV_CACHE_DIR", None)
    return [sys.executable, str(PERF / "bench.py"), *args], env


def test_bench_writes_each_row_as_it_is_measured(tmp_path):
    """Killed in the middle of a run, bench.py leaves a valid CSV holding every row
    measured so far; and it leaves no temporary folder behind."""
    out = tmp_path / "out"
    command, env = _bench(tmp_path, "--quick", "--out", str(out))
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as run:
        for line in run.stdout:
            if line.startswith("[2/"):  # two cells done
                run.kill()
                break
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["shape"], r["layout"]) for r in rows}) >= 2
    assert all(float(r["median_ms"]) > 0 for r in rows)
    command, env = _bench(tmp_path / "second", "--quick", "--cells", "quick-op", "--out", str(out))
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    assert not [p for p in (tmp_path / "second" / "tmp").iterdir() if p.name.startswith("tritondeconv")]


def test_bench_selects_cells_and_methods_and_stops_at_its_budget(tmp_path):
    command, env = _bench(tmp_path, "--quick", "--cells", "quick-op", "--methods", "tritondeconv,naive",
                          "--back-to-back", "1", "--out", str(tmp_path / "out"))
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    with open(tmp_path / "out" / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["shape"].split()[0] for r in rows} == {"quick-op"}
    assert {r["method"] for r in rows} == {"tritondeconv", "naive"}
    # Back to back: the wall time per call everywhere; the kernels' own time and a graph's replay on a GPU.
    assert all(float(r["wall_us"]) > 0 and (r["gpu_us"] != "") == (r["graphed_us"] != "") == COMPILED for r in rows)
    assert "back-to-back wall time" in (tmp_path / "out" / "bench.md").read_text()
    command, env = _bench(tmp_path, "--quick", "--budget", "0", "--out", str(tmp_path / "none"))
    run = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    assert "budget of 0 s spent: stopped after 0 of" in run.stdout
    assert not (tmp_path / "none").exists()  # the results folder is made only to write into


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the suites are timed")
def test_bench_without_a_gpu_points_to_quick(tmp_path):
    command, env = _bench(tmp_path, "--out", str(tmp_path / "out"))
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "no GPU here" in run.stderr and "--quick" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_bench_blocks_quick(tmp_path):
    subprocess.run([sys.executable, str(PERF / "bench_blocks.py"), "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    with open(tmp_path / "blocks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["block"].split()[0], r["method"]) for r in rows} == {
        ("fold", "tritondeconv_fold"), ("fold", "interpolate_conv2d"), ("epilogue", "fused"), ("epilogue", "unfused"),
        ("decoder", "fused"), ("decoder", "eager")}  # (torch.compile's column: on a GPU)
    assert all(float(r["rel_error"]) < 2e-3 for r in rows)
    assert (tmp_path / "blocks.md").read_text().count("Geometric-mean speedup") == 3


def _tile_sides(row: dict) -> tuple:
    """A compile report row's tile sides that ``tl.dot`` needs 16 wide."""
    return tile_sides(row["kernel"], dict(c.split("=", 1) for c in row["constants"].split()))


# Records the launches of a leaky_relu layer's forward and backward in float64 and float32
# (nothing runs), prints each kernel's float parameters as "family name type" and, per
# dtype, the type of the phase GEMM's slope in its sm_90 IR and how the IR uses it.
_FLOAT_SCALARS = """
import re, sys; sys.path.insert(0, sys.argv[1]); import common; common.use_compiler()
import torch, tritondeconv
seen = []
with common.recording(lambda request, candidates, timed: seen.append((request, candidates[0])), per_key=1):
    for dtype in (torch.float64, torch.float32):
        x, w = (torch.randn(shape, dtype=dtype, requires_grad=True) for shape in ((1, 16, 4, 4), (16, 16, 3, 3)))
        y = tritondeconv.conv_transpose2d(x, w, None, 2, 1, activation="leaky_relu", negative_slope=0.1)
        torch.autograd.grad(y, (x, w), torch.ones_like(y))
for request, config in seen:
    for param, arg in zip(request.kernel.params, request.args):
        if isinstance(arg, float):
            print("float", request.family, param.name, param.annotation_type or "unannotated")
    if request.constants.get("ACTIVATION") == "leaky_relu":
        ir = common.compile_for_hopper(request, config).asm["ttir"]
        uses = [line.split("=", 1)[1].split()[0] for line in ir.splitlines() if "%negative_slope " in line]
        print("ir", str(request.args[0].dtype), re.search(r"%negative_slope: (\\w+)", ir)[1], *uses)
"""


def test_float_scalars_reach_the_compiled_kernel_unrounded():
    """Every Python float a kernel takes (the activation's slope) is a float64 parameter:
    an unannotated float reaches a compiled kernel rounded to float32, which the
    interpreter (exact) never shows.  Compiled for sm_90, the phase GEMM takes the
    slope as ``f64`` for every dtype, uses it as it is in float64 and rounds it once
    (``truncf``) in float32, as PyTorch rounds the scalar to the dtype it computes in."""
    run = subprocess.run([sys.executable, "-c", _FLOAT_SCALARS, str(PERF)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    floats = {tuple(line[1:]) for line in lines if line[0] == "float"}
    assert floats == {("phase_gemm", "negative_slope", "fp64")}
    assert sorted(tuple(line[1:]) for line in lines if line[0] == "ir") == [
        ("torch.float32", "f64", "arith.truncf"), ("torch.float64", "f64", "tt.splat")]


def test_quick_launches_compile_for_hopper(tmp_path):
    """Every configuration the tuner offers on two small layers, in both layouts,
    compiles for sm_90 with the installed Triton (no GPU needed) and fits an H100 block,
    the ordinary layer's 64-row tensor-core tiles use Hopper's wgmma, the k = s layer's
    one-GEMM variant compiles (on wgmma), the experimental TMA variant (asked for here)
    reads through the tensor memory accelerator, no FMA tile issues a tensor-core
    instruction, no phase GEMM has a division in a loop, and the ordinary layer's NCHW
    input, copied to channels-last (the race's other run), is read by its phase GEMMs
    with vector loads and no single-element ones and their MMAs overlap the loads, the
    copy itself storing vectors; and the weight gradient (with the bias gradient's
    programs and without) neither divides in a loop nor spills, its warpgroup-sized
    tensor-core tiles on channels-last tensors running on wgmma fed by asynchronous
    copies, MMAs in flight."""
    run = subprocess.run([sys.executable, str(PERF / "hopper_compile.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "TRITONDECONV_EXPERIMENTAL": "tma"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "quick.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in ("phase_gemm", "weight_grad", "channels_last", "sum_splits") for d in ("bf16", "fp32")}
    assert {r["mode"].split()[0] for r in rows if r["kernel"] == "phase_gemm"} == {"transposed", "direct"}
    assert all(not r["error"] and r["fits"] == "True" for r in rows)
    tensor_core = [r for r in rows if int(r["wgmma"]) + int(r["mma_sync"]) > 0]
    assert tensor_core and len(tensor_core) < len(rows)  # both paths were compiled
    # An FMA tile stays on FMAs: Triton 3.6 would turn one 16 columns wide over 4
    # channels into a tensor-core dot that computes wrong results on the GPU.
    fma = [r for r in rows if r["kernel"] in ("phase_gemm", "weight_grad") and min(_tile_sides(r)) < 16]
    assert any(_tile_sides(r) == (16, 4) for r in fma)  # the shape that was rewritten
    assert not [r["tile"] for r in fma if r in tensor_core]
    warpgroup_tiles = [r for r in tensor_core if r["tile"].startswith("64x") and " w4 " in r["tile"]]
    assert warpgroup_tiles and all(int(r["wgmma"]) > 0 for r in warpgroup_tiles)
    # The k = s layer's one-GEMM variant compiles too, and no phase GEMM divides in its loop.
    assert any("one-gemm" in r["mode"] and int(r["wgmma"]) > 0 for r in rows)
    tma = [r for r in rows if "tma" in r["mode"].split()]
    assert tma and all(int(r["tma"]) > 0 for r in tma)
    assert all(int(r["loop_divisions"]) == 0 for r in rows if r["kernel"] == "phase_gemm")
    staged = [r for r in tensor_core if r["kernel"] == "phase_gemm" and not r["mode"].endswith("tma")
              and "sxc=1" in r["constants"].split()
              and "quick-wide 1x64x8x8->64 k4 s2 p1 bf16 nchw staged" in r["cells"]]
    assert {r["mode"] for r in staged} == {"transposed", "direct"}  # the forward and the input gradient
    assert all(int(r["scalar_loads"]) == 0 and int(r["vector_loads"]) > 0 and int(r["wgmma_in_flight"]) > 0
               for r in staged)
    copies = [r for r in rows if r["kernel"] == "channels_last"]
    assert copies and all(int(r["vector_stores"]) > 0 for r in copies)
    weights = [r for r in rows if r["kernel"] == "weight_grad"]
    assert {"HAS_BIAS=True" in r["constants"].split() for r in weights} == {False, True}
    assert all(int(r["loop_divisions"]) == 0 and int(r["local_bytes"]) == 0 for r in weights)
    # (Tiles of 64 rows or more: a warpgroup MMA's; narrower ones use mma.sync.)
    contiguous = [r for r in weights if r in tensor_core and int(r["tile"].split("x")[0]) >= 64
                  and {"sxc=1", "syc=1"} <= set(r["constants"].split())]
    assert {"HAS_BIAS=True" in r["constants"].split() for r in contiguous} == {False, True}
    assert all(int(r["wgmma"]) > 0 and int(r["async_copies"]) + int(r["tma"]) > 0 and int(r["wgmma_in_flight"]) > 0
               for r in contiguous)


def test_a_report_takes_unchanged_kernels_launches_from_an_earlier_one(tmp_path):
    """``--reuse CSV KERNELS``: the named kernels' launches come from the earlier report
    where it holds them (every one of them here), the others are compiled, and the
    report reads as a fresh one would."""
    first = subprocess.run([sys.executable, str(PERF / "hopper_compile.py"), "--quick", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run([sys.executable, str(PERF / "hopper_compile.py"), "--quick", "--out", str(tmp_path / "b"),
                             "--reuse", str(tmp_path / "a" / "quick.csv"), "phase_gemm,channels_last"],
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = {name: list(csv.DictReader(open(tmp_path / name / "quick.csv", newline=""))) for name in ("a", "b")}
    reused = [r for r in rows["a"] if r["kernel"] in ("phase_gemm", "channels_last")]
    assert f"({len(reused)} taken from " in second.stdout
    assert f"compiling {len(rows['a']) - len(reused)} for sm_90" in second.stdout
    assert rows["a"] == rows["b"]


def test_every_api_variant_compiles_for_hopper(tmp_path):
    """Every kernel variant the public API can launch (each dtype, TF32 on and off, both
    layouts, groups and depthwise, few channels, dilation, 1-D and 3-D, every fused
    activation with a residual, the folded upsample+conv, the naive op, 64-bit indexing;
    forward and backward) compiles for sm_90 with the installed Triton, in the tile the
    cost model picks for it (the committed reports compile the best 6): the GPU-only
    code paths that the interpreter never compiles."""
    run = subprocess.run([sys.executable, str(PERF / "hopper_compile.py"), "--api", "--per-key", "1",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "api.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32", "fp64"}
    constants = " ".join(r["constants"] for r in rows)
    for needed in ("INPUT_PRECISION=tf32", "INPUT_PRECISION=ieee", "INT64_INDEX=True", "TRANSPOSED=False",
                   *(f"ACTIVATION={a}" for a in ("relu", "leaky_relu", "silu", "gelu", "tanh", "sigmoid")),
                   "HAS_RESIDUAL=True"):
        assert needed in constants, needed
    assert all(not r["error"] and r["fits"] == "True" for r in rows)


def _only_python3_on_the_path(bin_dir: Path) -> str:
    """A PATH holding the shell tools gpu_check.sh uses and ``python3`` (this
    interpreter), as on the GPU image: no ``python``, no ``pip``, no ``nvidia-smi``."""
    import shutil
    bin_dir.mkdir()
    tools = ("bash", "dirname", "mktemp", "rm", "mkdir", "tar", "gzip", "tee", "timeout", "grep", "cat", "nproc",
             "tail", "sed")
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").write_text(f'#!{shutil.which("bash")}\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return str(bin_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is of a GPU run on a machine without one")
def test_gpu_check_rehearsal_stops_every_stage_at_its_budget(tmp_path):
    """The whole GPU run, rehearsed on CPU (GPU_CHECK_DRY=1): every stage runs, every
    measuring stage stops at its budget (a fake clock) with valid partial results, and
    everything comes back in at most 8 files."""
    out = tmp_path / "out"
    env = {"PATH": _only_python3_on_the_path(tmp_path / "bin"), "HOME": str(tmp_path), "GPU_CHECK_DRY": "1",
           "STAGE_BUDGET": "30", "TRITONDECONV_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(["bash", str(PERF / "gpu_check.sh"), str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]
    summary = dict(line.split(": ", 1) for line in (out / "summary.txt").read_text().splitlines())
    listed = subprocess.run(["bash", str(PERF / "gpu_check.sh"), "--list"], capture_output=True, text=True, check=True)
    stages = [line.split()[0] for line in listed.stdout.splitlines()]
    for stage in stages:
        if stage in ("smoke", "tests"):
            assert summary[stage].startswith("ok"), (stage, summary[stage])
        elif stage == "sanitize":
            assert summary[stage] == "skipped (no compute-sanitizer)"
        else:
            assert summary[stage].startswith("stopped at its budget of 30 s (partial)"), (stage, summary[stage])
    assert summary["carried-cache"] == "not used in a dry run"
    unpacked = tmp_path / "results"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(out / "results.tar.gz"), "-C", str(unpacked)], check=True)
    for name, key in (("bench.csv", "median_ms"), ("blocks.csv", "median_ms"), ("tune_check.csv", "timed_over_best")):
        with open(unpacked / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(float(r[key]) > 0 for r in rows), name
    # Each of the 10 bench stages measured one cell before its budget ran out, and wrote it
    # (--quick measures fp32 only: the fp16/fp32 and variants stages' first cell is the
    # NCHW stage's, the grads stage's the forward's; the classes stage's is a depthwise
    # layer of its own); the host stage's with its back-to-back wall time.
    with open(unpacked / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    measured = {(r["shape"], r["dtype"], r["layout"], r["pass"]) for r in rows}
    assert len(measured) == 7 and {p for *_, p in measured} == {"fwd", "fwd+bwd", "wgrad"}
    assert all(float(r["wall_us"]) > 0 for r in rows if r["shape"].startswith("quick-small"))
    assert (unpacked / "host-overhead.txt").read_text().count("Python-level calls") == 1


def test_candidates_counts_and_warms_a_stage():
    """perf/candidates.py knows every launch a stage's first calls time (as on an H100):
    fewer timed than offered, at most 6 per key and kernel variant; ``warm`` compiles each distinct one
    once, on several threads (here with the compile replaced by one that shows them)."""
    script = (
        "import sys, threading; sys.path.insert(0, sys.argv[1]); import candidates\n"
        "r = candidates.count('nd'); print(r['keys'], r['offered'], r['timed'], r['compiles'])\n"
        "import itertools; order = itertools.count()\n"
        "seen, threads, together = [], set(), threading.Barrier(2, timeout=60)\n"
        "def fake(request, config):\n"
        "    seen.append((request.family, repr(sorted(config.items())))); threads.add(threading.get_ident())\n"
        "    if next(order) < 2: together.wait()  # the first two compiles can only finish side by side\n"
        "print(candidates.warm('nd', compile_one=fake, workers=4)[:2], len(seen), len(threads) > 1)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(PERF)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    counts, warmed = run.stdout.splitlines()[-2:]
    keys, offered, timed, compiles = map(int, counts.split())
    assert keys > 0 and timed <= 6 * 2 * keys and timed < offered and 0 < compiles <= timed  # (k = s: two variants)
    assert warmed == f"({compiles}, 0) {compiles} True"


def test_host_overhead_reports_every_part():
    """perf/host_overhead.py (the GPU run's smoke stage runs it too) times every call
    beside aten's and every part, Triton's JIT binding the forward kernel's arguments
    among them: every runtime argument of the phase GEMM (bound as an sm_90 target
    would, without a GPU)."""
    from tritondeconv.kernels.phase_gemm import _phase_gemm_kernel

    run = subprocess.run([sys.executable, str(PERF / "host_overhead.py"), "--repeat", "20"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    calls = {row[0]: row[1:] for row in rows if len(row) == 4 and row[0] != "call"}
    assert len(calls) == 6 and all(float(ours) > 0 and float(aten) > 0 for ours, aten, _ in calls.values())
    binding = [row for row in rows if row[0].startswith("Triton's JIT per launch")]
    parameters = inspect.signature(_phase_gemm_kernel.fn).parameters.values()  # (jitted or interpreted)
    runtime = [p for p in parameters if "constexpr" not in str(p.annotation)]
    assert len(binding) == 1 and f"the forward kernel's {len(runtime)} arguments" in binding[0][0]
    assert float(binding[0][1]) > 0
    # Where the training step's backward went: our prepared gradients, both ways (the CPU's
    # engine runs it on the calling thread either way), and the trace's table.
    routes = {row[0]: row[1] for row in rows if len(row) == 3 and row[0].startswith(("the engine's way", "inline"))}
    assert len(routes) == 2 and all(route.endswith(" / 0") and route != "0 / 0" for route in routes.values())
    assert any(row[0] == "Recorded" for row in rows if len(row) == 3)


def test_a_call_makes_few_python_level_calls():
    """Python-level calls (function and builtin calls, as ``sys.setprofile`` counts them)
    with the launches stubbed (everything but Triton's C launcher runs): a module's
    forward makes at most 60, a training step at most 250 (torch.nn's module makes about
    15 and 50; ours made 118 and 311 before the prepared calls and the lean launch, 431
    and 1167 with Triton's JIT launch counted)."""
    run = subprocess.run([sys.executable, str(PERF / "host_overhead.py"), "--counts"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    counts = {row[0]: (int(row[1]), int(row[2])) for row in rows[1:]}
    assert 0 < counts["module forward (no grad)"][0] <= 60, counts
    assert 0 < counts["training step (module forward, sum, backward)"][0] <= 250, counts


def test_plot_figures_read_at_a_glance():
    """The figures from the committed CPU smoke CSV: log speedup axes with 1x marked, a
    panel per (pass, layout) the CSV holds, one colour per dtype shared by the roofline's
    roofs and points, titles naming GPU, versions and date."""
    pytest.importorskip("matplotlib", reason="perf/plot.py needs matplotlib")
    import matplotlib.pyplot as plt
    sys.path.insert(0, str(PERF))
    try:
        import plot
    finally:
        sys.path.remove(str(PERF))
    rows = plot.load(Path(__file__).parent.parent / "docs" / "cpu-smoke" / "bench.csv")
    for baseline in ("naive", "cudnn"):
        fig = plot.speedup_figure(rows, baseline)
        expected = {(r["pass"], r["layout"]) for r in rows if r["method"] == baseline}
        assert len(fig.axes) == len(expected)
        for ax in fig.axes:
            assert ax.get_yscale() == "log" and any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fp32"]
        assert rows[0]["gpu"] in fig.get_suptitle() and rows[0]["versions"] in fig.get_suptitle()
        assert rows[0]["date"] in fig.get_suptitle()
        plt.close(fig)
    fig = plot.roofline_figure(rows)
    (ax,) = fig.axes
    legend = ax.get_legend()
    colours = {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert {"roof fp32", "tritondeconv fp32", "cudnn fp32"} <= set(colours)
    from matplotlib.colors import to_hex
    assert to_hex(colours["roof fp32"].get_color()) == to_hex(colours["tritondeconv fp32"].get_facecolor()[0]) \
        == to_hex(colours["cudnn fp32"].get_facecolor()[0])
    assert ax.get_xscale() == ax.get_yscale() == "log"
    plt.close(fig)


def test_plot_without_a_csv_says_where_it_looked_and_what_to_run(tmp_path):
    run = subprocess.run([sys.executable, str(PERF / "plot.py"), str(tmp_path / "bench.csv")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "does not exist" in run.stderr and "perf/bench.py" in run.stderr


def test_a_carried_triton_cache_holds_what_a_first_launch_looks_up(tmp_path):
    """perf/triton_cache.py compiles a stage's launches for sm_90 with Triton's own JIT
    (no GPU needed) and packs them; unpacked elsewhere, as on the GPU machine, a new
    process's JIT finds every one of them under its own cache key and compiles nothing."""
    archive, cache = tmp_path / "cache.tar.gz", tmp_path / "unpacked"
    cells = ["--stages", "fwd-bf16-cl", "--cells", "FCN"]
    build = subprocess.run([sys.executable, str(PERF / "triton_cache.py"), "build", *cells, "--out", str(archive)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    unpack = subprocess.run([sys.executable, str(PERF / "triton_cache.py"), "unpack", str(archive), str(cache)],
                            capture_output=True, text=True, timeout=600)
    assert unpack.returncode == 0, unpack.stderr[-3000:]
    kernels = int(unpack.stdout.split()[0])
    entries = sorted(p.name for p in cache.iterdir())
    assert kernels > 0 and len(entries) == kernels + 1  # one folder per kernel, and the manifest
    assert not list(cache.glob("*/*.ptx")) and not list(cache.glob("*/*.llir"))  # only what a launch loads
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import common; common.use_compiler(); import candidates\n"
        "with common.hopper_jit(): print(candidates.warm('fwd-bf16-cl', cells='FCN')[:3])\n"
    )
    again = subprocess.run([sys.executable, "-c", script, str(PERF)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TRITON_CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == f"({kernels}, 0, {kernels})"  # compiled, failed, found in the cache
    assert sorted(p.name for p in cache.iterdir()) == entries
