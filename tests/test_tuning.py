"""Choosing configurations: the paths each kernel family offers, every offered
configuration computing the same result, pruning, and the tuning cache on disk
(persistence, corrupt and stale files, concurrent writers)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

import tritondeconv
from reference import DTYPES, TOLERANCES, assert_close, fresh_seed, layout, reference, relative_error
from tritondeconv.kernels import phase_gemm, tuning, weight_grad
from tritondeconv.kernels.tuning import CacheFile, NoConfigurationRan, Tuner, cache_path, config, prune
from triton.runtime.errors import OutOfResources

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

FAMILIES = {"phase_gemm": phase_gemm.configs, "weight_grad": weight_grad.configs}


def _uses_dot(c: dict, family: str) -> bool:
    """Whether a configuration multiplies on tensor cores (both of its GEMM's channel tiles >= 16)."""
    sides = ("BLOCK_N", "BLOCK_K") if family == "phase_gemm" else ("BLOCK_M", "BLOCK_N")
    return all(c[side] >= 16 for side in sides)


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


def _each_offered_config(monkeypatch, tuner: Tuner, run):
    """``run()`` once per configuration ``tuner`` offers on its first call; the outputs."""
    offered, outputs, index = [], [], 0
    while index == 0 or index < len(offered[0]):
        chosen = index
        monkeypatch.setattr(tuner, "pick", lambda device_name, key, candidates, launch, tune=None:
                            offered.append(candidates()) or candidates()[chosen])
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
def test_every_offered_config_is_correct(device, monkeypatch, precision, n, c_in, c_out, groups):
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
    for out in _each_offered_config(monkeypatch, phase_gemm._TUNER, lambda: tritondeconv.conv_transpose2d(x, w, b, *args)):
        assert_close(out, ref, precision, seed)

    gy = torch.randn(ref.shape, device=device).to(dtype)
    w_ref = w.double().requires_grad_()
    torch.nn.functional.conv_transpose2d(x.double(), w_ref, None, *args).backward(gy.double())
    for grad_w in _each_offered_config(
        monkeypatch, weight_grad._TUNER,
        lambda: torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], groups),
    ):
        assert relative_error(grad_w, w_ref.grad) <= TOLERANCES[precision], f"seed {seed}"


def test_prune_fits_tiles_to_the_problem_and_the_gpu():
    candidates = [config(128, 128, 64, num_stages=4), config(128, 16, 64), config(64, 64, 16), config(32, 16, 16, num_stages=2)]
    # Three output channels: no column tile wider than 16 (tl.dot's minimum).
    assert prune(candidates, 4096, 3, 256, 2, None) == [candidates[1], candidates[3]]
    # Few rows: no 128-row tile for 40 rows.
    assert prune(candidates, 40, 64, 256, 2, None) == [candidates[2], candidates[3]]
    # Shared memory: 4 stages × (128×64 + 64×128) × 4 bytes = 256 KiB does not fit in 228 KiB.
    assert candidates[0] not in prune(candidates, 4096, 256, 256, 4, 228 * 1024)
    assert candidates[0] in prune(candidates, 4096, 256, 256, 2, 228 * 1024)
    # Nothing fits: the smallest candidate, never an empty list.
    assert prune(candidates, 4096, 256, 256, 8, 1024) == [candidates[3]]


def test_phase_gemm_key_separates_shape_classes(device, monkeypatch):
    """One tuning per layout, dtype and size bucket; image sizes in one bucket share it."""
    keys = []
    monkeypatch.setattr(phase_gemm._TUNER, "pick", lambda device_name, key, candidates, launch, tune=None:
                        keys.append(key) or candidates()[0])
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device)
    for shape, kind, dtype in [((2, 4, 6, 6), "nchw", torch.float64), ((2, 4, 6, 6), "channels_last", torch.float64),
                               ((2, 4, 6, 7), "nchw", torch.float64), ((2, 4, 6, 6), "nchw", torch.float32),
                               ((2, 4, 12, 12), "nchw", torch.float64)]:
        x = layout(torch.randn(shape, dtype=dtype, device=device), kind)
        tritondeconv.conv_transpose2d(x, w.to(dtype), None, 2, 1, 1)
    nchw, channels_last, wider, fp32, larger = keys
    assert len({nchw, channels_last, fp32, larger}) == 4
    assert nchw == wider  # rows per phase 2*6*6 and 2*6*7 share the bucket 128


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


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path))
    return tmp_path


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
    def time_config(launch):
        raise RuntimeError("nothing runs")
    with pytest.raises(NoConfigurationRan, match="no configuration of t could run"):
        Tuner("t", None, time_config).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)


def test_tuning_is_logged_and_reported(cache_dir, caplog):
    before = len(tuning.tuning_report())
    with caplog.at_level("INFO", logger="tritondeconv"):
        _pick(_tuner([]), key=("logged", 1))
    (entry,) = tuning.tuning_report()[before:]
    assert entry.key == ("logged", 1) and entry.config == CANDIDATES[1]
    assert [c for c, _ in entry.timings] == CANDIDATES and all(ms > 0 for _, ms in entry.timings)
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_capture_does_not_time(cache_dir):
    """Nothing can be timed inside a CUDA-graph capture: an untuned key gets the first
    candidate there, and is tuned at its first call outside."""
    def no_timing(launch):
        raise AssertionError("timed during capture")
    tuner = Tuner("capture", None, no_timing)
    torch.cuda.synchronize()
    with pytest.warns(UserWarning, match="call the model once before capturing"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        chosen = tuner.pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert chosen == CANDIDATES[0]
    tuner.time_config = lambda launch: SPEED[launch()["BLOCK_M"]]
    assert tuner.pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True) == CANDIDATES[1]
