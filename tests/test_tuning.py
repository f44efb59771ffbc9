"""Choosing configurations: the paths each kernel family offers, every offered
configuration computing the same result, pruning, and the tuning cache on disk
(persistence, corrupt and stale files, concurrent writers)."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import triton

import tritondeconv
from tritondeconv.kernels.common import configured, observe_launches, simulate_capture
from reference import (
    DTYPES, TOLERANCES, assert_close, fresh_seed, input_copies, layout, reference, relative_error, tile_sides)
from tritondeconv.kernels import cost, launcher, phase_gemm, tuning, weight_grad
from tritondeconv.kernels.cost import Part, Problem, prune
from tritondeconv.kernels.tuning import CacheFile, NoConfigurationRan, Tuner, cache_path, config
from triton.runtime.errors import OutOfResources

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

FAMILIES = {"phase_gemm": phase_gemm.configs, "weight_grad": weight_grad.configs}


def _uses_dot(c: dict, family: str) -> bool:
    """Whether a configuration multiplies on tensor cores (both of its GEMM's channel tiles >= 16)."""
    return min(tile_sides(family, c)) >= 16


# (reduced channels, produced channels) -> which paths are offered, first path first.
PATHS = [
    pytest.param(1, 1, ["fma"], id="depthwise"),
    pytest.param(64, 3, ["dot", "fma"], id="few-output-channels"),
    pytest.param(3, 64, ["dot", "fma"], id="few-input-channels"),
    pytest.param(64, 64, ["dot"], id="wide"),
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("c_red, c_col, paths", PATHS)
def test_paths_offered_by_shape(family, c_red, c_col, paths):
    # weight_grad's configs take (C_in, C_out); for the forward those are (reduced, produced).
    offered = FAMILIES[family](c_red, c_col)
    kinds = ["dot" if _uses_dot(c, family) else "fma" for c in offered]
    assert [k for i, k in enumerate(kinds) if k not in kinds[:i]] == paths
    for c in offered:
        if not _uses_dot(c, family):  # FMA tiles are exactly as wide as narrow channel counts
            sides = ("BLOCK_K", "BLOCK_N") if family == "phase_gemm" else ("BLOCK_M", "BLOCK_N")
            assert all(c[side] == min(triton.next_power_of_2(ch), 16) for side, ch in zip(sides, (c_red, c_col)))


def _each_offered_config(family: str, run):
    """``run()`` once per configuration the ``family``'s launcher offers its tuner (pruned
    and ranked as the launcher does); the outputs."""
    offered, outputs, index = [], [], 0
    while index == 0 or index < len(offered[0]):
        def choose(request, candidates, chosen=index):
            if request.family != family:
                return candidates[0]
            offered.append(candidates)
            return candidates[chosen]
        with launcher.intercept(choose=choose):
            outputs.append(run())
        index += 1
    return outputs


SHAPES = [  # (N, C_in, C_out, groups): one per path
    pytest.param(2, 4, 4, 4, id="depthwise"),
    pytest.param(2, 20, 3, 1, id="few-output-channels"),
    pytest.param(2, 3, 20, 1, id="few-input-channels"),
    pytest.param(2, 20, 18, 1, id="wide"),
]


@pytest.mark.parametrize("precision", ["float64", "bfloat16"], indirect=True)
@pytest.mark.parametrize("n, c_in, c_out, groups", SHAPES)
def test_every_offered_config_is_correct(device, precision, n, c_in, c_out, groups):
    """Forward and weight gradient with each configuration the tuner could pick."""
    if device == "cpu" and precision != "float64":
        pytest.skip("interpreter suite: one precision on CPU")
    seed = fresh_seed()
    dtype = DTYPES[precision]
    size = 5 if device == "cpu" else 17
    x = layout(torch.randn(n, c_in, size, size + 2, device=device).to(dtype), "channels_last")
    w = torch.randn(c_in, c_out // groups, 4, 4, device=device).to(dtype)
    b = torch.randn(c_out, device=device).to(dtype)
    args = (2, 1, 0, groups)
    ref = reference(x, w, b, *args, 1)
    for out in _each_offered_config("phase_gemm", lambda: tritondeconv.conv_transpose2d(x, w, b, *args)):
        assert_close(out, ref, precision, seed)

    gy = torch.randn(ref.shape, device=device).to(dtype)
    w_ref = w.double().requires_grad_()
    torch.nn.functional.conv_transpose2d(x.double(), w_ref, None, *args).backward(gy.double())
    for grad_w in _each_offered_config(
        "weight_grad",
        lambda: torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], groups),
    ):
        assert relative_error(grad_w, w_ref.grad) <= TOLERANCES[precision], f"seed {seed}"


def _problem(rows: int, columns: int, depth: int, element_size: int = 2) -> Problem:
    return Problem((Part(1, rows, columns, depth, 1),), element_size, "float16", ("BLOCK_N", "BLOCK_K"))


def test_prune_fits_tiles_to_the_problem_and_the_gpu():
    candidates = [config(128, 128, 64, num_stages=4), config(128, 16, 64), config(64, 64, 16), config(32, 16, 16, num_stages=2),
                  config(128, 4, 16, num_stages=2)]
    # Three output channels: no tensor-core tile wider than 16 (tl.dot's minimum), the FMA tile as wide as 4.
    assert prune(candidates, _problem(4096, 3, 256), None) == [candidates[1], candidates[3], candidates[4]]
    # Few rows: no 128-row tensor-core tile for 40 rows (the FMA path's only tile stays).
    assert prune(candidates, _problem(40, 64, 256), None) == [candidates[2], candidates[3], candidates[4]]
    # Shared memory: 4 stages × (128×64 + 64×128) × 4 bytes = 256 KiB does not fit in 228 KiB.
    assert candidates[0] not in prune(candidates, _problem(4096, 256, 256, 4), 228 * 1024)
    assert candidates[0] in prune(candidates, _problem(4096, 256, 256, 2), 228 * 1024)
    # Nothing fits: the smallest candidate, never an empty list.
    assert prune(candidates, _problem(4096, 256, 256, 8), 1024) == [candidates[3]]


def test_phase_gemm_key_separates_shape_classes(device):
    """One tuning per layout, dtype, groups and size bucket; image sizes in one bucket share it."""
    keys = []
    with launcher.intercept(choose=lambda request, candidates: keys.append(request.key) or candidates[0]):
        for shape, kind, dtype, groups in [((2, 4, 6, 6), "nchw", torch.float64, 1), ((2, 4, 6, 6), "channels_last", torch.float64, 1),
                                           ((2, 4, 6, 7), "nchw", torch.float64, 1), ((2, 4, 6, 6), "nchw", torch.float32, 1),
                                           ((2, 4, 12, 12), "nchw", torch.float64, 1), ((2, 8, 6, 6), "nchw", torch.float64, 2)]:
            x = layout(torch.randn(shape, dtype=dtype, device=device), kind)
            w = torch.randn(shape[1], 3, 3, 3, dtype=dtype, device=device)
            tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, groups)
    nchw, channels_last, wider, fp32, larger, grouped = keys
    assert len({nchw, channels_last, fp32, larger, grouped}) == 5
    assert nchw == wider  # rows per phase 2*6*6 and 2*6*7 share the bucket 128


def test_weight_grad_key_holds_the_geometry(device):
    """The weight gradient's key tells apart what decides which pixels hit: kernel size,
    padding, dilation (and groups), not only channels and stride."""
    keys = []
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    def choose(request, candidates):
        if request.family == "weight_grad":
            keys.append(request.key)
        return candidates[0]
    with launcher.intercept(choose=choose):
        for k, p, d, g in [(3, 1, 1, 1), (4, 1, 1, 1), (3, 0, 1, 1), (3, 1, 2, 1), (3, 1, 1, 2)]:
            w = torch.randn(4, 4 // g, k, k, dtype=torch.float64, device=device)
            gy = torch.randn(tritondeconv.conv_transpose2d(x, w, None, 2, p, 0, g, d).shape, dtype=torch.float64, device=device)
            torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [k, k], [2, 2], [p, p], [d, d], g)
    assert len(set(keys)) == 5


# ---------------------------------------------------------------- the cache on disk

CANDIDATES = [config(64, 64, 32), config(128, 128, 64), config(32, 16, 16)]
SPEED = {64: 2.0, 128: 1.0, 32: 3.0}  # fake median ms by BLOCK_M: the 128 tile is fastest


class FakeKernel:
    cache_key = "source-hash-1"


def _tuner(timed: list, kernel=FakeKernel()) -> Tuner:
    """A tuner whose "timing" records what it timed and answers from SPEED."""
    def time_config(launch):
        config_ = launch()
        timed.append(config_)
        return SPEED[config_["BLOCK_M"]]
    return Tuner("test_kernel", kernel, time_config)


def _pick(tuner: Tuner, key=("k", 1)) -> dict:
    return tuner.pick("Fake GPU", key, lambda: CANDIDATES, lambda c: c, tune=True)


def test_tuning_picks_the_fastest_and_persists_it(cache_dir):
    timed = []
    log_before = len(tuning.TUNING_LOG)
    assert _pick(_tuner(timed)) == CANDIDATES[1]
    assert timed == CANDIDATES  # every candidate timed once
    assert _pick(_tuner(timed)) == CANDIDATES[1]  # a new tuner ("process") reads the file
    assert len(timed) == 3  # ... without timing anything
    entry = tuning.TUNING_LOG[log_before]
    assert len(tuning.TUNING_LOG) == log_before + 1 and entry.candidates == 3 and entry.seconds >= 0
    data = json.loads(cache_path("Fake GPU").read_text())
    assert data["format"] == tuning.FORMAT and len(data["entries"]) == 1


def test_a_tuned_key_never_waits_behind_another_threads_tuning(cache_dir):
    """While one thread tunes a key (its clock held until released), another thread's
    launches of a key tuned earlier return at once: the tuner's lock is taken only by a
    key's first call."""
    tuner = _tuner([])
    tuned = _pick(tuner, ("tuned", 1))
    started, release = threading.Event(), threading.Event()

    def held_clock(launch):
        started.set()
        assert release.wait(timeout=60)
        return SPEED[launch()["BLOCK_M"]]

    tuning_thread = threading.Thread(target=lambda: tuner.pick("Fake GPU", ("new", 2), lambda: CANDIDATES, lambda c: c,
                                                              tune=True, clock=held_clock))
    tuning_thread.start()
    try:
        assert started.wait(timeout=60)  # the other thread is inside its tuning, holding the lock
        picks = []
        launcher_thread = threading.Thread(target=lambda: picks.extend(_pick(tuner, ("tuned", 1)) for _ in range(100)))
        launcher_thread.start()
        launcher_thread.join(timeout=10)
        assert not launcher_thread.is_alive() and picks == [tuned] * 100
        assert tuning_thread.is_alive()  # (still tuning: the launches above did not wait for it)
    finally:
        release.set()
        tuning_thread.join(timeout=60)
    assert tuner.chosen("Fake GPU", ("new", 2)) == CANDIDATES[1]


def test_untuned_pick_is_the_first_candidate_and_writes_nothing(cache_dir):
    timed = []
    assert _tuner(timed).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=False) == CANDIDATES[0]
    assert timed == [] and not cache_path("Fake GPU").exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b'{"format": 999, "entries": {}}',
                                     b'{"format": 1, "entries": []}', b"[]", b""],
                         ids=["truncated", "binary", "other-format", "wrong-type", "not-an-object", "empty"])
def test_corrupt_cache_is_ignored_and_rebuilt(cache_dir, content):
    path = cache_path("Fake GPU")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    timed = []
    with pytest.warns(UserWarning, match="tuning cache"):
        assert _pick(_tuner(timed)) == CANDIDATES[1]
    assert len(timed) == 3
    assert len(json.loads(path.read_text())["entries"]) == 1  # rebuilt, valid


def test_stale_entries_are_retuned(cache_dir):
    timed = []
    _pick(_tuner(timed))
    # A config no longer offered (the config list changed) is not reused ...
    path = cache_path("Fake GPU")
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["config"] = config(256, 256, 128)
    path.write_text(json.dumps(data))
    assert _pick(_tuner(timed)) == CANDIDATES[1] and len(timed) == 6
    # ... nor is a tuning of another version of the kernel's source.
    class Changed:
        cache_key = "source-hash-2"
    assert _pick(_tuner(timed, Changed())) == CANDIDATES[1] and len(timed) == 9


def test_unrunnable_configs_are_skipped(cache_dir):
    def time_config(launch):
        if launch()["BLOCK_M"] == 128:
            raise OutOfResources(300000, 232448, "shared memory")
        return SPEED[launch()["BLOCK_M"]]
    assert Tuner("t", None, time_config).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True) == CANDIDATES[0]


def test_a_candidate_failing_in_any_way_is_skipped_and_logged(cache_dir, caplog):
    def time_config(launch):
        if launch()["BLOCK_M"] == 128:
            raise ValueError("an error no compiler would raise")
        return SPEED[launch()["BLOCK_M"]]
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = Tuner("t", None, time_config).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert chosen == CANDIDATES[0]
    assert "skipped" in caplog.text and "ValueError" in caplog.text and "an error no compiler would raise" in caplog.text


def test_no_candidate_running_raises_what_the_op_layer_answers(cache_dir):
    attempts = []

    def time_config(launch):
        attempts.append(1)
        raise RuntimeError("nothing runs")
    tuner = Tuner("t", None, time_config)
    for _ in range(2):  # remembered: the second call does not try again
        with pytest.raises(NoConfigurationRan, match="no configuration of t could run"):
            tuner.pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert len(attempts) == len(CANDIDATES)


def test_tuning_is_logged_and_reported(cache_dir, caplog):
    before = len(tuning.tuning_report())
    with caplog.at_level("INFO", logger="tritondeconv"):
        _pick(_tuner([]), key=("logged", 1))
    (entry,) = tuning.tuning_report()[before:]
    assert entry.key == ("logged", 1) and entry.config == CANDIDATES[1]
    assert [t.config for t in entry.timings] == CANDIDATES and all(t.ms > 0 for t in entry.timings)
    assert "tuned test_kernel for shape class ('logged', 1)" in caplog.text and "chose 128x128x64" in caplog.text


def test_tritondeconv_log_switches_the_logger_on():
    script = "import tritondeconv, logging; print(logging.getLogger('tritondeconv').isEnabledFor(logging.INFO))"
    on = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITONDECONV_LOG": "1"},
                        capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", script], env={k: v for k, v in os.environ.items() if k != "TRITONDECONV_LOG"},
                         capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


def test_unwritable_cache_still_tunes(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(blocker / "sub"))  # a directory under a file
    with pytest.warns(UserWarning, match="cannot write tuning cache"):
        assert _pick(_tuner([])) == CANDIDATES[1]


def test_concurrent_processes_leave_a_valid_complete_cache(cache_dir):
    """Two processes tuning 40 keys each at the same time into one file: the file is
    valid JSON at the end and holds all 80 entries (merged under the lock)."""
    script = textwrap.dedent("""
        import sys
        from tritondeconv.kernels.tuning import Tuner, config
        tuner = Tuner("concurrent", None, lambda launch: float(launch()["BLOCK_M"]))
        candidates = [config(64, 64, 32), config(32, 16, 16)]
        for i in range(40):
            assert tuner.pick("Fake GPU", (sys.argv[1], i), lambda: candidates, lambda c: c, tune=True) == candidates[1]
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name]) for name in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = CacheFile(cache_path("Fake GPU")).read()
    assert len(entries) == 80
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([cache_path("Fake GPU").name, cache_path("Fake GPU").with_suffix(".lock").name])


def _cuda_graph_capture():
    torch.cuda.synchronize()
    return torch.cuda.graph(torch.cuda.CUDAGraph())


@pytest.mark.parametrize("capture", [
    pytest.param(simulate_capture, id="simulated"),
    pytest.param(_cuda_graph_capture, id="cuda-graph",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]),
])
def test_capture_does_not_time(cache_dir, capture):
    """Nothing can be timed inside a CUDA-graph capture: an untuned key gets the first
    candidate there, and is tuned at its first call outside (on a CPU, the same branch
    under ``simulate_capture``)."""
    def no_timing(launch):
        raise AssertionError("timed during capture")
    tuner = Tuner("capture", None, no_timing)
    with pytest.warns(UserWarning, match="call the model once before capturing"), capture():
        chosen = tuner.pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert chosen == CANDIDATES[0]
    assert not cache_path("Fake GPU").exists()
    tuner.time_config = lambda launch: SPEED[launch()["BLOCK_M"]]
    assert tuner.pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True) == CANDIDATES[1]


# ---------------------------------------------------------------- the cost model

H100 = launcher.H100


def _ranked_on_h100(family: str, call) -> tuple[list[dict], Problem]:
    """The candidates an H100 would rank for ``family``'s launch in ``call()`` (the
    launch's own problem, the family's GPU table, pruned and ranked as the launcher does)."""
    requests = []
    with launcher.intercept(choose=lambda request, candidates: requests.append(request) or candidates[0]):
        call()
    request = next(r for r in requests if r.family == family)
    problem = request.problem()
    table = FAMILIES[family]
    (c_a, c_b) = (problem.parts[0].depth, problem.parts[0].columns) if family == "phase_gemm" else \
        (problem.parts[0].rows, problem.parts[0].columns)
    return cost.rank(prune(table(c_a, c_b, interpreter=False), problem, H100.shared_memory), problem, H100.machine), problem


def _forward(n, c_in, c_out, size, k=4, s=2, p=1, groups=1, dtype=torch.bfloat16):
    x = torch.empty(n, c_in, size, size, dtype=dtype, device="meta")
    w = torch.empty(c_in, c_out // groups, k, k, dtype=dtype, device="meta")
    return lambda: launcher_only_forward(x, w, s, p, groups)


def launcher_only_forward(x, w, s, p, groups):
    """The forward's launch on meta tensors (nothing runs: the launch is replaced)."""
    out = torch.empty(x.shape[0], w.shape[1] * groups, (x.shape[2] - 1) * s - 2 * p + w.shape[2],
                      (x.shape[3] - 1) * s - 2 * p + w.shape[3], dtype=x.dtype, device="meta")
    with launcher.intercept(launch=lambda request, config: None):
        phase_gemm.phase_gemm(out[:, :, None], x[:, :, None], w[:, :, None], None, (1, s, s), (0, p, p), (1, 1, 1), groups,
                              transposed=True, allow_tf32=False)


@pytest.mark.parametrize("n, c_in, c_out, size, expect", [
    pytest.param(8, 64, 3, 64, "dot16", id="rgb-output-layer"),
    pytest.param(8, 24, 24, 32, "rows64-128", id="24-channels"),
    pytest.param(16, 256, 128, 32, "wide", id="wide-layer"),
    pytest.param(1, 64, 64, 4, "small-rows", id="tiny-image"),
    pytest.param(8, 8, 8, 32, "fma", id="depthwise"),
])
def test_cost_model_ranks_the_tiles_a_shape_needs(n, c_in, c_out, size, expect):
    groups = 8 if expect == "fma" else 1
    ranked, problem = _ranked_on_h100("phase_gemm", _forward(n, c_in, c_out, size, groups=groups))
    timed = ranked[:tuning.TIMED]
    best = ranked[0]
    if expect == "dot16":  # 3 output channels: a 16-wide tensor-core tile, ranked above every FMA tile
        assert cost.uses_dot(best, problem) and best["BLOCK_N"] == 16
    elif expect == "rows64-128":  # 17-32 channels: 64- and 128-row tiles, 32 wide, on offer and timed
        assert {c["BLOCK_M"] for c in ranked if c["BLOCK_N"] == 32} >= {64, 128}
        assert any(c["BLOCK_N"] == 32 and c["BLOCK_M"] >= 64 for c in timed)
    elif expect == "wide":
        assert best["BLOCK_N"] >= 64 and best["BLOCK_M"] >= 128 and best["BLOCK_K"] >= 32
    elif expect == "small-rows":  # 1 x 4 x 4 pixels per phase: 16 rows, no 128-row tile pays
        assert best["BLOCK_M"] <= 64
    else:  # one channel in, one out per group: FMA only
        assert not any(cost.uses_dot(c, problem) for c in ranked)
    assert 1 <= len(timed) <= 6


def test_cost_model_prefers_a_full_wave_and_no_spill():
    problem = Problem((Part(1, 132 * 128, 128, 64, 9),), 2, "bfloat16", ("BLOCK_N", "BLOCK_K"))
    machine = H100.machine
    # 132*128 rows: 128-row tiles make exactly one tile per SM; 256-row tiles leave half the SMs idle.
    assert cost.estimate(config(128, 128, 64, 8, 3), problem, machine) < cost.estimate(config(256, 128, 64, 8, 3), problem, machine)
    # A tile whose accumulator alone needs 256 registers per thread is ranked last.
    spilling = config(256, 256, 64, 4, 2)
    assert cost.registers_per_thread(spilling, problem) > 255
    assert cost.rank([spilling, config(128, 128, 64, 8, 3)], problem, machine)[0]["BLOCK_M"] == 128
    # With the GPU unknown, the ranking keeps the list's order.
    assert cost.rank([spilling, config(128, 128, 64, 8, 3)], problem, None)[0] is spilling


# ---------------------------------------------------------------- a first call's tuning

MANY = [config(16 * (i + 1), 16, 16) for i in range(10)]  # ten candidates, ranked in this order


def _fast(c: dict) -> float:
    return 10.0 / c["BLOCK_M"]  # larger tiles faster: the last candidate is the fastest


def test_only_the_cost_models_best_are_timed_unless_exhaustive(cache_dir):
    timed = []
    tuner = Tuner("ranked", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    assert tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True) == MANY[tuning.TIMED - 1]
    assert timed == MANY[:tuning.TIMED]
    timed.clear()
    with configured(autotune="exhaustive"):
        assert tuner.pick("Fake GPU", ("k2",), lambda: MANY, lambda c: c, tune=True) == MANY[-1]
    assert timed == MANY
    timed.clear()
    with configured(autotune="0"):
        assert tuner.pick("Fake GPU", ("k3",), lambda: MANY, lambda c: c) == MANY[0] and timed == []


def test_each_kernel_variant_gets_its_own_timed_share(cache_dir):
    """Where the candidates hold several kernel variants (a compile-time constant set or
    not), a first call times the best ``TIMED`` of each, in rank order, and can pick any."""
    variant = [dict(c, V=i % 4 == 3) for i, c in enumerate(MANY + [config(16 * (i + 11), 16, 16) for i in range(14)])]
    timed = []
    tuner = Tuner("variants", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    chosen = tuner.pick("Fake GPU", ("k",), lambda: variant, lambda c: c, tune=True, variants=("V",))
    plain, with_v = [c for c in variant if not c["V"]], [c for c in variant if c["V"]]
    assert timed == [c for c in variant if c in plain[:tuning.TIMED] + with_v[:tuning.TIMED]]
    assert chosen == with_v[tuning.TIMED - 1]  # the fastest timed: past the overall best 6
    assert tuning.first_timed(variant, ("V",), 0) == variant


def test_a_k_equals_s_layer_times_the_best_of_both_variants():
    """The k = s layer offers the phase GEMMs and the one GEMM: its first call times the
    cost model's best of each (an H100's ranking), so the tuner's pick is never slower
    than tuning either variant alone would find."""
    requests = []
    with launcher.intercept(choose=lambda request, candidates: requests.append(request) or candidates[0]):
        _forward(16, 64, 64, 32, k=2, s=2, p=0)()
    (request,) = requests
    problem = request.problem()
    table = phase_gemm.configs(64, 64, 64 * 4, interpreter=False)
    ranked = cost.rank(prune(table, problem, H100.shared_memory), problem, H100.machine)
    timed = tuning.first_timed(ranked, request.variants)
    for one_gemm in (False, True):
        alone = [c for c in ranked if c["ONE_GEMM"] == one_gemm]
        assert len(alone) > tuning.TIMED and all(c in timed for c in alone[:tuning.TIMED])
    assert len(timed) == 2 * tuning.TIMED and timed == [c for c in ranked if c in timed] and timed[0] == ranked[0]


def test_candidates_compile_concurrently_before_any_is_timed(cache_dir):
    events = []
    together = threading.Barrier(2, timeout=30)  # two compiles must be under way at once

    def compile_(c):
        if c in MANY[:2]:
            together.wait()
        events.append(("compile", c["BLOCK_M"]))
        return tuning.Compiled(n_regs=64, n_spills=0, shared=0)

    def clock(run):
        config = run()
        events.append(("time", config["BLOCK_M"]))
        return _fast(config)

    Tuner("parallel", None, clock).pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=compile_)
    kinds = [kind for kind, _ in events]
    assert kinds.count("compile") == tuning.TIMED and kinds == sorted(kinds)  # every compile before the first timing
    (entry,) = [t for t in tuning.tuning_report() if t.kernel == "parallel"]
    assert all(t.compile_s is not None and t.compile_s >= 0 for t in entry.timings)


def test_spilling_and_failing_candidates_are_dropped_but_never_the_last(cache_dir, caplog):
    spills = {16: 0, 32: 8, 48: 0, 64: 0, 80: 0, 96: 0}

    def compile_(c):
        if c["BLOCK_M"] == 48:
            raise RuntimeError("PassManager::run failed")
        return tuning.Compiled(n_regs=255, n_spills=spills[c["BLOCK_M"]], shared=0)

    timed = []
    tuner = Tuner("filters", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=compile_)
    assert chosen == MANY[5] and [c["BLOCK_M"] for c in timed] == [16, 64, 80, 96]
    assert "PassManager::run failed" in caplog.text
    notes = {t.config["BLOCK_M"]: t.note for t in tuning.tuning_report()[-1].timings}
    assert notes[32] == "spills 8 registers" and notes[48].startswith("failed to compile")
    # Every candidate spills: the least spilling ones are still timed.
    timed.clear()
    chosen = tuner.pick("Fake GPU", ("k2",), lambda: MANY[:3], lambda c: c, tune=True,
                        compile=lambda c: tuning.Compiled(255, {16: 4, 32: 2, 48: 2}[c["BLOCK_M"]], 0))
    assert chosen == MANY[2] and [c["BLOCK_M"] for c in timed] == [32, 48]


def test_a_compile_step_failing_for_every_candidate_falls_back_to_timing_them(cache_dir, caplog):
    """If compiling ahead fails for all (an API that moved, not the candidates), the
    candidates are still timed (each compiled at its launch) rather than all dropped."""
    timed = []
    tuner = Tuner("compile-step", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])

    def broken(c):
        raise AttributeError("'CompiledKernel' object has no attribute 'n_spills'")
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=broken)
    assert chosen == MANY[tuning.TIMED - 1] and timed == MANY[:tuning.TIMED]
    assert "compiling ahead failed for every candidate" in caplog.text


def test_a_winner_that_disagrees_with_the_default_is_not_kept(cache_dir, caplog):
    good = torch.randn(64, dtype=torch.float64)
    fastest = MANY[tuning.TIMED - 1]
    order = iter(MANY[:tuning.TIMED])  # the tuner times in ranked order
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = Tuner("checked").pick("Fake GPU", ("k",), lambda: MANY,
                                       lambda c: good + 1e-3 if c == fastest else good.clone(), tune=True,
                                       clock=lambda run: (run(), _fast(next(order)))[1])
    assert chosen == MANY[0] and "disagrees" in caplog.text


def test_agreement_is_up_to_summation_order_with_the_same_nan_and_inf():
    good = torch.randn(64, dtype=torch.float64)
    assert tuning.agree(good, good + 1e-12) and not tuning.agree(good, good + 1e-3)
    nan, inf = good.clone(), good.clone()
    nan[3], inf[5] = float("nan"), float("inf")
    assert not tuning.agree(good, nan) and tuning.agree(nan, nan.clone())
    assert not tuning.agree(good, inf) and not tuning.agree(inf, -inf) and tuning.agree(inf, inf.clone())
    half = good.half()
    assert tuning.agree(half, (half.float() * (1 + 1e-3)).half())


# ---------------------------------------------------------------- the same, through the ops

def _narrow_layer(device):
    """A layer with 3 output channels: two candidates (tensor cores, FMA) in the interpreter
    (channels-last input: its 20 NCHW channels would also race a channels-last copy)."""
    x = layout(torch.randn(2, 20, 5, 5, dtype=torch.float64, device=device), "channels_last")
    w = torch.randn(20, 3, 4, 4, dtype=torch.float64, device=device)
    return x, w, torch.nn.functional.conv_transpose2d(x, w, None, 2, 1)


def _recording_launches(launched: list, corrupt=None):
    """A launch hook that runs the real kernel, records each configuration, and (for
    ``corrupt(config)``) then overwrites one output element."""
    def launch(request, config):
        launcher.run_kernel(request, config)
        launched.append((request.family, config))
        if corrupt is not None and corrupt(config):
            request.output[(0,) * request.output.dim()] += 1.0
    return launch


def _fma(config: dict) -> bool:
    return config["BLOCK_N"] < 16


def _described(config: dict) -> tuple:
    """A configuration as a value that can be compared and collected."""
    return tuple(sorted(config.items()))


@pytest.mark.fma_only("the fake clock makes the FMA tile win the tuning: the launch that computes the result is FMA")
def test_a_first_call_tunes_through_the_seam_and_remembers(device, first_calls):
    x, w, ref = _narrow_layer(device)
    launched = []
    clock = lambda run: (run(), 0.5 if _fma(launched[-1][1]) else 1.0)[1]  # noqa: E731 (FMA "faster")
    with launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched)):
        assert_close(tritondeconv.conv_transpose2d(x, w, None, 2, 1), ref, "float64", 0)
        tuned = len(launched)
        tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    entry = tuning.tuning_report()[-1]
    timed = {_described(trial.config) for trial in entry.timings if not trial.note}
    assert entry.kernel == "phase_gemm" and _fma(entry.config) and len(timed) >= 2  # (how many: the device's table)
    assert timed == {_described(config) for _, config in launched[:tuned]}  # each timed through the seam
    assert _fma(launched[-1][1]) and len(launched) == tuned + 1  # the second call: one launch, nothing timed


@pytest.mark.fma_only("the fake clock makes the FMA tile win one of the tunings")
def test_a_forgotten_tuning_is_tuned_again(device, first_calls, monkeypatch, tmp_path):
    """``forget_tunings`` forgets a layer's configuration everywhere it is kept (the
    launch plan keeps it too): with a cache file that has not seen the layer either, the
    next call tunes again and keeps the new winner."""
    x, w, ref = _narrow_layer(device)
    for fma_wins in (True, False):
        monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path / str(fma_wins)))
        launched = []
        clock = lambda run: (run(), 0.5 if _fma(launched[-1][1]) == fma_wins else 1.0)[1]  # noqa: E731
        with launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched)):
            tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            tuned = len(launched)
            assert_close(tritondeconv.conv_transpose2d(x, w, None, 2, 1), ref, "float64", 0)
        assert tuned > 2 and len(launched) == tuned + 1 and _fma(launched[-1][1]) == fma_wins, fma_wins
        launcher.forget_tunings()


def test_a_kernel_that_disagrees_is_caught_by_the_first_tuning(device, first_calls, caplog):
    """Fault injection: the FMA tile (timed fastest) corrupts one output element; the
    winner check keeps the tensor-core tile, and the result is right."""
    x, w, ref = _narrow_layer(device)
    launched = []
    clock = lambda run: (run(), 0.5 if _fma(launched[-1][1]) else 1.0)[1]  # noqa: E731
    with caplog.at_level("WARNING", logger="tritondeconv"), \
            launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched, corrupt=_fma)):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, ref, "float64", 0)
    assert not _fma(tuning.tuning_report()[-1].config) and "disagrees" in caplog.text


@pytest.mark.no_kernel("every launch is made to fail, so aten computes the call")
def test_no_runnable_candidate_falls_back_to_aten_with_one_warning(device, first_calls):
    x, w, ref = _narrow_layer(device)

    def launch(request, config):
        raise RuntimeError("injected: no configuration runs")

    with launcher.intercept(tune=True, clock=lambda run: (run(), 1.0)[1], launch=launch), \
            pytest.warns(UserWarning, match="computed by aten's convolution instead"):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("winner", ["aten", "tritondeconv"])
def test_auto_backend_races_aten_per_op_and_remembers(device, first_calls, winner):
    x, w, ref = _narrow_layer(device)
    x.requires_grad_()
    calls = []

    def clock(run):
        with observe_launches() as launched:
            run()
        ours = bool(launched)  # aten's run launches no kernel
        calls.append(ours)
        return 1.0 if ours == (winner == "aten") else 0.5

    tritondeconv.set_backend("auto")
    with launcher.intercept(tune=True, clock=clock):
        with observe_launches():
            out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            out.backward(torch.ones_like(out))
        timed = len(calls)
        with observe_launches() as again:
            out2 = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, ref, "float64", 0)
    assert_close(out2, ref, "float64", 0)
    raced = {t.key[0] for t in tuning.tuning_report() if t.kernel == "backend"}
    assert {"conv_transpose2d", "conv_transpose_input_grad"} <= raced
    assert len(calls) == timed  # remembered: the second forward times nothing
    assert bool(again) == (winner == "tritondeconv")


def _layout_clock(winner: str, timed: list):
    """A clock under which run ``winner`` (``"staged"``: the one that copies its input)
    is the faster; it records which run it timed (True: the staged one)."""
    def clock(run):
        with observe_launches() as launched:
            run()
        staged = input_copies(launched) > 0
        timed.append(staged)
        return 0.5 if staged == (winner == "staged") else 1.0
    return clock


@pytest.mark.parametrize("winner", ["staged", "gathered"])
def test_nchw_input_races_a_channels_last_copy_and_remembers(device, first_calls, winner):
    """On NCHW input with 16 or more channels, a layer's first call times the phase GEMM
    on the input as given and on a channels-last copy of it, keeps the faster, and its
    later calls take that one without timing anything."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    ref = torch.nn.functional.conv_transpose2d(x, w, None, 2, 1)
    timed = []
    with launcher.intercept(tune=True, clock=_layout_clock(winner, timed)):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
        with observe_launches() as again:
            out2 = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert sorted(timed) == [False, True]  # each run timed once, the second call timed nothing
    assert_close(out, ref, "float64", 0)
    assert_close(out2, ref, "float64", 0)
    assert (input_copies(again) > 0) == (winner == "staged")
    entry = tuning.tuning_report()[-1]
    assert (entry.kernel, entry.config) == ("input_layout", {"backend": winner})


def test_a_forgotten_race_is_raced_again(device, first_calls, monkeypatch, tmp_path):
    """``forget_tunings`` forgets the input-layout race too (whose answer the launch
    plan also keeps): with a cache file that has not seen the layer either, the next
    call races again, and keeps the new answer."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    for winner in ("staged", "gathered"):
        monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path / winner))
        timed = []
        with launcher.intercept(tune=True, clock=_layout_clock(winner, timed)):
            tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            with observe_launches() as again:
                tritondeconv.conv_transpose2d(x, w, None, 2, 1)
        assert sorted(timed) == [False, True] and (input_copies(again) > 0) == (winner == "staged"), winner
        launcher.forget_tunings()


def test_auto_backend_times_a_layer_whose_kernels_race_a_copy(device, first_calls):
    """Under the ``auto`` backend, timing our kernels on NCHW input runs the race
    between the input as given and its channels-last copy inside the race with aten:
    both complete (each race tunes under its own family) and the result is right."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    tritondeconv.set_backend("auto")
    with launcher.intercept(tune=True, clock=lambda run: (run(), 1.0)[1]):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, torch.nn.functional.conv_transpose2d(x, w, None, 2, 1), "float64", 0)
    assert {t.kernel for t in tuning.tuning_report()[-2:]} == {"input_layout", "backend"}


def test_backend_switch_refuses_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of triton, auto"):
        tritondeconv.set_backend("cudnn")
    assert tritondeconv.get_backend() == "triton"


