"""Shipped tunings (the tuning files measured on known GPUs, shipped as package data):
consulted after one's own cache and before tuning, the same staleness rules, the
package's own files valid, the export command; and the announcement of a slow first
tuning."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import triton

from tritondeconv import tunings
from tritondeconv.kernels import grouped, launcher, phase_gemm, weight_grad
from tritondeconv.kernels.tuning import (
    FORMAT,
    SHIPPED_DIR,
    CacheFile,
    Tuner,
    cache_name,
    cache_path,
    config,
    shipped_path,
    source_version,
)

CANDIDATES = [config(64, 64, 32), config(128, 128, 64), config(32, 32, 32)]
GPU = "Fake GPU"


class FakeKernel:
    cache_key = "source-hash-1"


def _tuner(timed: list, fastest: dict = CANDIDATES[1]) -> Tuner:
    """A tuner whose "timing" records what it timed and makes ``fastest`` the fastest."""
    def time_config(launch):
        config_ = launch()
        timed.append(config_)
        return 1.0 if config_ == fastest else 2.0
    return Tuner("test_kernel", FakeKernel(), time_config)


def _pick(tuner: Tuner, key=("k", 1)) -> dict:
    return tuner.pick(GPU, key, lambda: CANDIDATES, lambda c: c, tune=True)


@pytest.fixture
def shipped_dir(cache_dir, tmp_path, monkeypatch):
    """A folder of shipped tunings for the test (``TRITONDECONV_SHIPPED_TUNINGS``), beside
    its empty cache folder."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setenv("TRITONDECONV_SHIPPED_TUNINGS", str(folder))
    return folder


def _ship_measured(winner: dict, keys=(("k", 1),)) -> None:
    """Tune ``keys`` (``winner`` the fastest) into the cache, export the cache as this
    GPU's shipped tunings, and empty the cache: as if measured on another machine."""
    for key in keys:
        _pick(_tuner([], winner), key)
    assert tunings.main(["export", "--gpu", GPU, str(shipped_path(GPU))]) == 0
    cache_path(GPU).unlink()


def _measure_here(winner: dict) -> None:
    """Tune the key (``winner`` the fastest) into this machine's cache, whatever is shipped."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITONDECONV_SHIPPED_TUNINGS", "0")
        _pick(_tuner([], winner))


def _ship(content: bytes, name: str | None = None) -> None:
    (shipped_path(GPU).parent / (name or cache_name(GPU))).write_bytes(content)


def test_a_shipped_entry_answers_without_timing_or_writing_the_cache(shipped_dir):
    _ship_measured(CANDIDATES[2])
    timed = []
    assert _pick(_tuner(timed)) == CANDIDATES[2]  # tuning would have chosen CANDIDATES[1]
    assert timed == [] and not cache_path(GPU).exists()


def test_ones_own_cache_beats_the_shipped_tunings(shipped_dir):
    _ship_measured(CANDIDATES[2])
    _measure_here(CANDIDATES[0])
    timed = []
    assert _pick(_tuner(timed)) == CANDIDATES[0] and timed == []


def test_a_shipped_entry_whose_config_is_no_candidate_is_stale(shipped_dir):
    _ship_measured(CANDIDATES[2])
    data = json.loads(shipped_path(GPU).read_text())
    (entry,) = data["entries"].values()
    entry["config"] = config(256, 256, 128)
    _ship(json.dumps(data).encode())
    timed = []
    assert _pick(_tuner(timed)) == CANDIDATES[1] and timed == CANDIDATES  # tuned
    (entry,) = CacheFile(cache_path(GPU)).read().values()
    assert entry["config"] == CANDIDATES[1]


def test_a_stale_entry_of_ones_own_falls_through_to_the_shipped_one(shipped_dir):
    _ship_measured(CANDIDATES[2])
    _measure_here(CANDIDATES[0])
    data = json.loads(cache_path(GPU).read_text())
    (entry,) = data["entries"].values()
    entry["config"] = config(256, 256, 128)
    cache_path(GPU).write_text(json.dumps(data))
    timed = []
    assert _pick(_tuner(timed)) == CANDIDATES[2] and timed == []


def test_shipped_tunings_of_another_kernel_source_are_not_matched(shipped_dir):
    _ship_measured(CANDIDATES[2])

    class Changed:
        cache_key = "source-hash-2"
    timed = []
    assert Tuner("test_kernel", Changed(), _tuner(timed).time_config).pick(
        GPU, ("k", 1), lambda: CANDIDATES, lambda c: c, tune=True) == CANDIDATES[1]
    assert timed == CANDIDATES


@pytest.mark.parametrize("corrupt", ["other-format", "truncated", "not-an-object"])
def test_a_shipped_file_of_another_format_or_corrupt_is_ignored(shipped_dir, corrupt):
    _ship_measured(CANDIDATES[2])
    data = json.loads(shipped_path(GPU).read_text())
    content = {"other-format": json.dumps({**data, "format": FORMAT + 1}).encode(),  # entries that would match
               "truncated": shipped_path(GPU).read_bytes()[:-20], "not-an-object": b"[]"}[corrupt]
    _ship(content)
    timed = []
    with pytest.warns(UserWarning, match="ignoring corrupt or outdated shipped tunings"):
        assert _pick(_tuner(timed)) == CANDIDATES[1]
    assert timed == CANDIDATES
    assert shipped_path(GPU).read_bytes() == content  # never rewritten


def test_shipped_tunings_of_another_triton_version_are_ignored(shipped_dir):
    _ship_measured(CANDIDATES[2])
    shipped_path(GPU).rename(shipped_dir / cache_name(GPU).replace(f"triton{triton.__version__}", "triton0.0.0"))
    timed = []
    assert _pick(_tuner(timed)) == CANDIDATES[1] and timed == CANDIDATES


def test_the_shipped_folder_is_the_packages_unless_set(monkeypatch):
    monkeypatch.delenv("TRITONDECONV_SHIPPED_TUNINGS", raising=False)
    assert shipped_path(GPU) == SHIPPED_DIR / cache_name(GPU)
    monkeypatch.setenv("TRITONDECONV_SHIPPED_TUNINGS", "0")
    assert shipped_path(GPU) is None


def test_a_shipped_race_answers_the_race_without_timing(first_calls, shipped_dir):
    """The races (``launcher.race``: the input's layout, the ``auto`` backend) are
    answered from the shipped tunings as the kernels' tunings are."""
    cpu = torch.device("cpu")
    key = ("shipped race", "torch.float64")
    called = []
    runs = {name: (lambda name=name: called.append(name) or torch.zeros(2)) for name in ("a", "b")}

    def clock_preferring(winner: str, timed: list):
        def clock(run):
            run()
            timed.append(called[-1])
            return 0.5 if called[-1] == winner else 1.0
        return clock

    with launcher.intercept(tune=True, clock=clock_preferring("b", [])):
        assert launcher.race(cpu, key, runs, family="shipped_race_test") == "b"
    assert tunings.main(["export", "--gpu", "cpu", str(shipped_path("cpu"))]) == 0
    cache_path("cpu").unlink()
    launcher.forget_tunings()
    timed = []
    with launcher.intercept(tune=True, clock=clock_preferring("a", timed)):
        assert launcher.race(cpu, key, runs, family="shipped_race_test") == "b"
    assert timed == [] and not cache_path("cpu").exists()


def _plausible(family: str, key: list, chosen: dict) -> bool:
    """Whether ``chosen`` is a configuration ``family`` offers (where the key says enough
    to rebuild its candidates) or has the same constants (where it does not)."""
    if family in ("input_layout", "operand_layout"):
        return chosen in ({"backend": "gathered"}, {"backend": "staged"})
    if family == "grouping":
        return chosen in ({"backend": "grouped"}, {"backend": "gathered"})
    if family == "grouped":  # key: the phase GEMM's (transposed, reduced channels per group, ...)
        return chosen in grouped.configs(key[1], interpreter=False)
    if family == "backend":
        return chosen in ({"backend": "tritondeconv"}, {"backend": "aten"})
    if family == "phase_gemm":  # key: transposed, reduced and produced channels per group, ...
        offered = phase_gemm.configs(key[1], key[2], interpreter=False)
        if chosen.get("ONE_GEMM") or chosen.get("TMA_W"):  # a variant's tiles are those of another GEMM
            return set(chosen) == set(offered[0])
        return chosen in offered
    # weight_grad's key: channels in and out per group, groups, then kernel size, stride,
    # padding and dilation per axis, the dtype, the precision, both layouts, ...; its
    # boxes depend on the image size, which the key holds only bucketed.
    c_in, c_out = key[0], key[1]
    rank = (next(i for i, v in enumerate(key) if isinstance(v, str)) - 3) // 4
    gathered = not (key[4 * rank + 5] and key[4 * rank + 6])
    offered = weight_grad.configs(c_in, c_out, math.prod(key[3:3 + rank]), gathered=gathered, interpreter=False)

    def tile(c):
        return {k: v for k, v in c.items() if not k.startswith("BOX_")}
    return set(chosen) == set(offered[0]) and tile(chosen) in [tile(c) for c in offered]


def test_the_packages_shipped_tunings_are_valid():
    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert files, f"no shipped tunings in {SHIPPED_DIR}"
    for path in files:
        assert re.fullmatch(r"tuning-[A-Za-z0-9-]+-triton[0-9][0-9a-z.+]*\.json", path.name), path.name
        data = json.loads(path.read_text())
        assert data["format"] == FORMAT and data["entries"], path.name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert CacheFile(path, shipped=True).read() == data["entries"]
        for entry_key, entry in data["entries"].items():
            family, version, *key = json.loads(entry_key)
            if family in ("phase_gemm", "weight_grad", "grouped"):
                assert re.fullmatch(r"[0-9a-f]{64}", version), entry_key  # the hash of the kernel's source
            else:  # a race's answer
                assert family in ("input_layout", "operand_layout", "grouping", "backend") and version == "", entry_key
            assert isinstance(entry["ms"], float) and entry["ms"] > 0, entry_key
            assert _plausible(family, key, entry["config"]), (entry_key, entry["config"])


def test_export_round_trips_and_merges(cache_dir, tmp_path):
    for key in (("k", 1), ("k", 2)):
        _pick(_tuner([]), key)
    out = tmp_path / "exported.json"
    CacheFile(out).write({"earlier": {"config": CANDIDATES[0], "ms": 1.0}})
    assert tunings.main(["export", "--gpu", GPU, str(out)]) == 0
    data = json.loads(out.read_text())
    mine = CacheFile(cache_path(GPU)).read()
    assert data == {"format": FORMAT, "entries": {**mine, "earlier": {"config": CANDIDATES[0], "ms": 1.0}}}
    assert len(mine) == 2


def test_export_of_an_empty_cache_writes_nothing(cache_dir, tmp_path, capsys):
    out = tmp_path / "exported.json"
    assert tunings.main(["export", "--gpu", GPU, str(out)]) == 1
    assert not out.exists() and "nothing exported" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["import", "x.json"], ["export"], ["export", "--gpu"],
                                  ["export", "--gpu", GPU, "missing-folder/x.json"],
                                  pytest.param(["export", "x.json"], marks=pytest.mark.skipif(
                                      torch.cuda.is_available(), reason="names the current GPU"))],
                         ids=["no-command", "unknown-command", "no-file", "no-gpu-name", "unwritable", "no-gpu-here"])
def test_export_usage_errors_exit_2_with_one_line(cache_dir, argv, capsys, monkeypatch):
    if "missing-folder/x.json" in argv:
        _pick(_tuner([]))  # (something to export)
    monkeypatch.chdir(cache_dir)
    with pytest.raises(SystemExit) as exit_:
        tunings.main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("python -m tritondeconv.tunings") and "error:" in error[-1]


def test_export_runs_as_a_module(cache_dir, tmp_path):
    _pick(_tuner([]))
    out = tmp_path / "exported.json"
    done = subprocess.run([sys.executable, "-m", "tritondeconv.tunings", "export", "--gpu", GPU, str(out)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "TRITONDECONV_CACHE_DIR": str(cache_dir)})
    assert done.returncode == 0, done.stderr
    assert CacheFile(out).read() == CacheFile(cache_path(GPU)).read()
    assert cache_name(GPU) in done.stdout  # the name to ship it under
    usage = subprocess.run([sys.executable, "-m", "tritondeconv.tunings", "export"], capture_output=True, text=True,
                           check=False)
    assert usage.returncode == 2 and "error:" in usage.stderr


# A process that tunes three keys: one quickly (under the default threshold), then two
# "slowly" (a threshold of 0 s).
SLOW_SCRIPT = textwrap.dedent("""
    from tritondeconv.kernels.tuning import Tuner, config
    candidates = [config(64, 64, 32), config(32, 16, 16)]
    for key, slow_s in [(("fast", "torch.float16"), None), (("slow", "torch.float16"), 0.0),
                        (("slow again", "torch.float16"), 0.0)]:
        tuner = Tuner("slow_kernel", None, lambda launch: float(launch()["BLOCK_M"]),
                      **({} if slow_s is None else {"slow_s": slow_s}))
        tuner.pick("Fake GPU", key, lambda: candidates, lambda c: c, tune=True)
""")


@pytest.fixture(scope="module", params=["unconfigured", "TRITONDECONV_LOG=1"])
def announced(request, tmp_path_factory):
    """The stderr of ``SLOW_SCRIPT`` run in a new process (logging unconfigured, or
    switched on by ``TRITONDECONV_LOG``), and its cache folder."""
    cache = tmp_path_factory.mktemp("slow-cache")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITONDECONV_LOG", "TRITONDECONV_AUTOTUNE")}
    env["TRITONDECONV_CACHE_DIR"] = str(cache)
    if request.param != "unconfigured":
        env["TRITONDECONV_LOG"] = "1"
    done = subprocess.run([sys.executable, "-c", SLOW_SCRIPT], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr, cache


def _announcements(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "spent" in line and "tuning" in line]


def test_a_slow_first_tuning_is_announced_with_what_to_do(announced):
    stderr, cache = announced
    (line,) = _announcements(stderr)
    assert "slow_kernel (float16) for shape class ('slow', 'torch.float16')" in line
    assert re.search(r"spent \d+\.\d s tuning \(2 of 2 candidates timed\)", line)
    assert str(cache / cache_name(GPU)) in line
    assert "TRITONDECONV_AUTOTUNE=0" in line and "shipped" in line


def test_a_quick_tuning_is_not_announced(announced):
    assert "'fast'" not in "".join(_announcements(announced[0]))


def test_a_slow_tuning_is_announced_once_per_process(announced):
    assert len(_announcements(announced[0])) == 1 and "slow again" not in "".join(_announcements(announced[0]))


# ---------------------------------------------------------------- what keys a kernel's tunings

_KERNEL_SOURCE = '''
from triton.runtime.jit import JITFunction

SCALE = {scale}


def helper(x):
    return x + {offset}


helper = JITFunction(helper)


def kernel(x):{comment}
    return helper(x) * SCALE


kernel = JITFunction(kernel)
'''


def _jit_version(tmp_path, name: str, *, blank_lines: int = 0, comment: str = "", scale: int = 2,
                 offset: int = 1) -> str:
    """``source_version`` of a ``@triton.jit`` kernel (and its helper) written to a module
    of its own, ``blank_lines`` below the top of the file."""
    path = tmp_path / f"{name}.py"
    path.write_text("\n" * blank_lines + _KERNEL_SOURCE.format(comment=comment, scale=scale, offset=offset))
    spec = importlib.util.spec_from_file_location("tuned_kernel", path)  # one module name: the key names it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return source_version(module.kernel)


def test_a_kernels_tunings_survive_an_edit_above_it_but_not_a_change_of_what_it_runs(tmp_path):
    """The key of a kernel's tunings (shipped ones included) is its code, its helpers'
    and the constants they read, not the line it starts at (Triton's cache_key hashes
    that too: a shipped tuning would look stale after any edit above the kernel) nor
    its comments."""
    base = _jit_version(tmp_path, "base")
    assert base and base == _jit_version(tmp_path, "moved", blank_lines=7)
    assert base == _jit_version(tmp_path, "commented", comment="\n    # the scaled successor")
    assert _jit_version(tmp_path, "helper_changed", offset=3) != base
    assert _jit_version(tmp_path, "constant_changed", scale=4) != base
