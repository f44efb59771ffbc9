"""The tuner and its cache on disk: the fastest candidate picked and persisted,
corrupt, stale and unwritable files, candidates that fail, logging, concurrent
threads and processes, and no timing inside a CUDA-graph capture."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from triton.runtime.errors import OutOfResources

from tritondeconv.kernels import tuning
from tritondeconv.kernels.common import simulate_capture
from tritondeconv.kernels.tuning import (
    CacheFile,
    NoConfigurationRan,
    Tuner,
    cache_path,
    config,
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CANDIDATES = [config(64, 64, 32), config(128, 128, 64), config(32, 16, 16)]
SPEED = {64: 2.0, 128: 1.0, 32: 3.0}  # fake median ms by BLOCK_M: the 128 tile is fastest


class FakeKernel:
    cache_key = "source-hash-1"


FAKE_KERNEL = FakeKernel()


def _tuner(timed: list, kernel=FAKE_KERNEL) -> Tuner:
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
    chosen = Tuner("t", None, time_config).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert chosen == CANDIDATES[0]


def test_a_candidate_failing_in_any_way_is_skipped_and_logged(cache_dir, caplog):
    def time_config(launch):
        if launch()["BLOCK_M"] == 128:
            raise ValueError("an error no compiler would raise")
        return SPEED[launch()["BLOCK_M"]]
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = Tuner("t", None, time_config).pick("Fake GPU", ("k",), lambda: CANDIDATES, lambda c: c, tune=True)
    assert chosen == CANDIDATES[0]
    assert ("skipped" in caplog.text and "ValueError" in caplog.text
            and "an error no compiler would raise" in caplog.text)


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
    off = subprocess.run([sys.executable, "-c", script],
                         env={k: v for k, v in os.environ.items() if k != "TRITONDECONV_LOG"},
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
    path = cache_path("Fake GPU")
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([path.name, path.with_suffix(".lock").name])


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
