"""Choosing a kernel's tile configuration: timing the best candidates, checking the
winner, and a tuning cache on disk.

Each kernel family's launcher builds a *shape-class key* (the things that change which
tile is fastest: channels, groups, taps, strides, dtype, layout, a bucketed row count)
and its candidates, pruned to the problem and the GPU and ranked by the static cost
model (``cost.py``; ``launcher.py`` does both).  The tuner answers, in order:

1. from memory, if this process has tuned the key already (no lock is taken: a thread
   launching a tuned key never waits behind another thread's tuning);
2. with the first candidate (the cost model's pick), untimed, when there is nothing to
   time: in the Triton interpreter (it cannot time anything), with
   ``TRITONDECONV_AUTOTUNE=0``, or when only one candidate survives;
3. from the cache file of this GPU model and Triton version, when it holds an entry for
   the key whose configuration is still a candidate (otherwise the entry is stale); then,
   by the same rule, from the tunings shipped with the package for this GPU model and
   Triton version (``shipped_path``), not copied into the cache file (which holds this
   machine's own measurements, and ``export`` shares);
4. with the first candidate, untimed and not remembered, during CUDA-graph capture
   (nothing can be timed there), with a warning that asks for a warm-up call before
   capturing;
5. by tuning: the best ``TIMED`` candidates of each kernel variant offered
   (``first_timed``; every one with ``TRITONDECONV_AUTOTUNE=exhaustive``) are compiled
   all at once on the host's cores,
   those the compiler reports spilling registers are dropped (unless all spill: then the
   least spilling stay), the rest are timed (median of ``triton.testing.do_bench``),
   and the fastest is checked against the cost model's pick: if their outputs disagree
   beyond summation order (``agree``), the pick is kept and the disagreement logged.
   A candidate that fails in any way (compile, resources, launch) is skipped and
   logged; when none runs, ``NoConfigurationRan`` is raised (and again at every later
   call of the key, without another attempt), which the op layer answers with aten's
   result and a warning.

The cache file lives in ``$TRITONDECONV_CACHE_DIR`` (default ``~/.cache/tritondeconv``),
one JSON file per (GPU name, Triton version).  A file that cannot be read or parsed is
ignored (with a warning) and replaced at the next write.  Writes merge with what is on
disk under an exclusive lock and land through an atomic rename, so processes tuning at
the same time never leave a torn file or drop each other's entries.  Every tuning done
by this process is appended to ``TUNING_LOG`` (with the seconds it took and each
candidate's compile time, run time or reason for being dropped), which
``tuning_report()`` returns and ``perf/bench.py`` reports; with ``TRITONDECONV_LOG=1``
(or the ``tritondeconv`` logger at INFO) each tuning is logged as it happens, as
``TRITON_PRINT_AUTOTUNING`` does for ``triton.autotune``.  The first tuning of a process
that takes longer than ``SLOW_TUNING_S`` is also announced once at WARNING (Python
prints it on stderr even where logging is not configured): which key, how many
candidates, how long, where the result is cached and how to skip tuning.

Shipped tunings: the package ships, as data in ``tunings/``, the cache files measured
on the GPUs the project has run on, each named as ``cache_name`` names it (so an entry
measured with another Triton version lives in another file, never read; a file of
another ``FORMAT`` is ignored with a warning).  ``$TRITONDECONV_SHIPPED_TUNINGS`` names
another folder to read them from, or ``0`` for none (``perf/bench.py`` and
``perf/tune_check.py`` set it where they tune from nothing).  The races of
``launcher.race`` (the input's layout, the ``auto`` backend) are tunings too, answered
from shipped entries alike.  Keys of the kernels hold a hash of their source
(``source_version``), so an entry measured before a kernel changed is not matched,
while one measured before an unrelated edit of the kernel's file still is.
``python -m tritondeconv.tunings export [--gpu NAME] OUT`` writes one's own cache file
for a GPU model (default: the current one) and this Triton version to ``OUT`` in the
same format, merged over what ``OUT`` holds: a file to add to ``tunings/`` as it is
named there (see ``docs/tunings.md``).

Why not ``triton.autotune``: its key is a list of argument values (it cannot express a
layout or a bucket without extra kernel arguments), and its on-disk cache raises on a
corrupt file.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from .common import INTERPRETING, SETTINGS, capturing

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, concurrent merges may drop an entry
    fcntl = None

FORMAT = 1  # bump when the file's layout changes; files of another format are ignored

LOG = logging.getLogger("tritondeconv")
if os.environ.get("TRITONDECONV_LOG", "0") not in ("", "0") and LOG.level == logging.NOTSET:
    LOG.setLevel(logging.INFO)
    LOG.addHandler(logging.StreamHandler())


class NoConfigurationRan(RuntimeError):
    """No candidate configuration of a kernel could run for a shape class."""


def config(BLOCK_M: int, BLOCK_N: int, BLOCK_K: int, num_warps: int = 4, num_stages: int = 3, **extra) -> dict:
    """A launch configuration: the kernel's tile constexprs plus ``num_warps`` and
    ``num_stages``, as keyword arguments of the launch (and as JSON in the cache)."""
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **extra, num_warps=num_warps, num_stages=num_stages)


# Products per reduction step of an FMA tile (BLOCK_M*BLOCK_N*BLOCK_K): the FMA path
# holds its whole product cube in registers, and 16384 of them are 128 fp32 registers per
# thread at 4 warps (64 at 8), about half of what a thread may hold without spilling.
FMA_PRODUCTS = 16384


def bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two: image sizes within a factor of two share
    one tuning instead of retuning for every resolution."""
    return triton.next_power_of_2(max(rows, 1))


def autotune_mode() -> str:
    """``TRITONDECONV_AUTOTUNE`` as ``common.SETTINGS`` holds it: ``"0"`` (time nothing:
    the cost model's pick), ``"exhaustive"`` (time every candidate), otherwise ``"1"``
    (time the cost model's best ``TIMED``)."""
    return SETTINGS.autotune


def cache_dir() -> Path:
    return Path(os.environ.get("TRITONDECONV_CACHE_DIR") or Path.home() / ".cache" / "tritondeconv")


def cache_path(device_name: str) -> Path:
    """The cache file for a GPU model and this Triton version."""
    return cache_dir() / cache_name(device_name)


def cache_name(device_name: str) -> str:
    """The name of the tuning file of a GPU model and this Triton version (in the cache
    folder, and among the shipped tunings)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name)
    return f"tuning-{slug}-triton{triton.__version__}.json"


SHIPPED_DIR = Path(__file__).parent / "tunings"  # the tunings shipped as package data


def shipped_path(device_name: str) -> Path | None:
    """The shipped tunings of a GPU model and this Triton version: in
    ``$TRITONDECONV_SHIPPED_TUNINGS`` if set (read at every lookup, as the cache folder
    is; ``0``: none, ``None``), otherwise in ``SHIPPED_DIR``.  The file may not exist."""
    folder = os.environ.get("TRITONDECONV_SHIPPED_TUNINGS") or SHIPPED_DIR
    return None if folder == "0" else Path(folder) / cache_name(device_name)


@dataclass
class Compiled:
    """What compiling a candidate tells before it runs: registers per thread, registers
    spilled to local memory, and shared memory in bytes."""
    n_regs: int
    n_spills: int
    shared: int


@dataclass
class Trial:
    """One candidate of a tuning: seconds its compilation took (``None``: not compiled
    apart), its median milliseconds (``inf``: it did not run), and why it was dropped
    or not timed (``""`` when it was timed)."""
    config: dict
    compile_s: float | None
    ms: float
    note: str = ""


@dataclass
class Tuning:
    """One tuning done by this process (an entry of ``TUNING_LOG``): the kernel, the key,
    the winner, the seconds the whole tuning took, how many candidates were considered,
    and each timed candidate's trial."""
    kernel: str
    key: tuple
    config: dict
    seconds: float
    candidates: int
    timings: list[Trial]
    variants: tuple = ()  # the compile-time constants that select the kernel's variants


TUNING_LOG: list[Tuning] = []


def tuning_report() -> list[Tuning]:
    """What this process has tuned, in order (a copy of ``TUNING_LOG``)."""
    return list(TUNING_LOG)


def _describe(config: dict) -> str:
    if "BLOCK_M" not in config:
        return ",".join(f"{k}={v}" for k, v in config.items())
    variant = " one-gemm" * bool(config.get("ONE_GEMM")) + (f" tma{config['TMA_W']}" if config.get("TMA_W") else "")
    return (f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
            f" w{config['num_warps']} s{config['num_stages']}" + variant)


def agree(reference: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two configurations' outputs are the same result up to summation order:
    the same NaN and infinity positions, and every finite element within a tolerance of
    the dtype (fp32 at TF32's) times the reference's largest finite magnitude."""
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}[reference.dtype]
    a, b = reference.double(), other.double()
    if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            and torch.equal(a[a.isinf()], b[b.isinf()])):
        return False
    finite = a.isfinite()
    if not finite.any():
        return True
    scale = a[finite].abs().max().clamp_min(1e-30)
    return bool(((a - b)[finite].abs() <= tolerance * scale).all())


class CacheFile:
    """The JSON tuning cache of one GPU model: ``{"format": FORMAT, "entries": {key:
    {"config": ..., "ms": ..., "tuning_s": ...}}}``; ``shipped``: a file of the package's
    shipped tunings (same format, only read)."""

    def __init__(self, path: Path, shipped: bool = False):
        self.path = path
        self.shipped = shipped

    def read(self) -> dict:
        """The entries on disk; ``{}`` if there is no file, and ``{}`` with a warning if
        it cannot be read, is not JSON, or has another format (a cache file will be
        rebuilt)."""
        what = "shipped tunings" if self.shipped else "tuning cache"
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            warnings.warn(f"tritondeconv: ignoring unreadable {what} {self.path}: {error}", stacklevel=2)
            return {}
        try:
            data = json.loads(raw.decode())
            entries = data["entries"] if data.get("format") == FORMAT else None
        except (ValueError, AttributeError, KeyError, TypeError):
            entries = None
        if not isinstance(entries, dict):
            rebuilt = "" if self.shipped else "; it will be rebuilt"
            warnings.warn(f"tritondeconv: ignoring corrupt or outdated {what} {self.path}{rebuilt}", stacklevel=2)
            return {}
        return entries

    def write(self, entries: dict) -> None:
        """Replace the file with ``entries`` (atomically: no reader sees a partial file)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def update(self, new: dict) -> None:
        """Merge ``new`` entries into the file: under an exclusive lock (so concurrent
        writers do not drop each other's entries), written to a temporary file and
        renamed over the old one (so no reader ever sees a partial file).  A cache
        that cannot be written is warned about; tuning results then live in memory."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                self.write({**self.read(), **new})
        except OSError as error:
            warnings.warn(f"tritondeconv: cannot write tuning cache {self.path}: {error}", stacklevel=2)


def export(device_name: str, out: Path) -> int:
    """Write this machine's tuning cache of ``device_name`` and this Triton version to
    ``out``, in the same format, merged over the entries ``out`` holds already (the
    cache's win); how many entries the cache held (0: nothing is written)."""
    entries = CacheFile(cache_path(device_name)).read()
    if entries:
        target = CacheFile(out)
        target.write({**target.read(), **entries})
    return len(entries)


def _median_ms(launch: Callable[[], None]) -> float:
    return triton.testing.do_bench(launch, warmup=5, rep=20, return_mode="median")


_NONE_RAN = object()  # the memo's answer for a key none of whose candidates could run
TIMED = 6  # candidates timed per key and kernel variant (the cost model's best); "exhaustive" times all
SLOW_TUNING_S = 1.0  # a first call tuning longer than this is announced (once per process) at WARNING


def first_timed(candidates: list[dict], variants: tuple = (), per_variant: int = TIMED) -> list[dict]:
    """The candidates (ranked, cheapest first) that a key's first call times: the best
    ``per_variant`` of each kernel variant among them (a variant: which of the
    compile-time constants ``variants`` a configuration sets), in rank order; 0: all.
    Each variant gets its own share, because the cost model compares tiles of one
    variant better than it compares variants: the tuner's pick is then as fast as the
    best of any one variant's own best ``per_variant`` (up to timing noise)."""
    if not per_variant:
        return list(candidates)
    taken: dict[tuple, int] = {}
    timed = []
    for c in candidates:
        variant = tuple(bool(c.get(name)) for name in variants)
        if taken.get(variant, 0) < per_variant:
            taken[variant] = taken.get(variant, 0) + 1
            timed.append(c)
    return timed


def source_version(kernel) -> str:
    """A hash of what a compiled ``@triton.jit`` kernel is made of: the syntax tree of its
    source and of every ``@triton.jit`` function it calls (through module attributes
    too, and theirs in turn), the values of the plain constants they read, and their
    decorators' specialisation arguments.  Anything else keys by its ``cache_key`` attribute, or
    ``""`` without one (the interpreter's kernels).

    Not Triton's own ``cache_key``, which also hashes the line each function starts at:
    moving a kernel within its file (an edit above it) would make every tuning of it,
    the shipped ones included, look stale, though it compiles to the same code; for the
    same reason a rewrapped line or an edited comment does not count."""
    jit_type = triton.runtime.jit.JITFunction
    if not isinstance(kernel, jit_type):
        return getattr(kernel, "cache_key", "")
    parts: dict[str, str] = {}

    def visit(fn) -> None:
        name = f"{fn.fn.__module__}.{fn.fn.__qualname__}"
        if name in parts:
            return
        code = ast.dump(ast.parse(textwrap.dedent(fn.src)))  # the syntax tree: layout and comments aside
        parts[name] = code + repr((getattr(fn, "do_not_specialize", None), getattr(fn, "noinline", None)))
        names = fn.fn.__code__.co_names
        for global_name in names:
            value = fn.__globals__.get(global_name)
            targets = [value]
            if isinstance(value, type(triton)):  # a module: the functions called through it
                targets = [getattr(value, attr, None) for attr in names]
            for target in targets:
                if isinstance(target, jit_type):
                    visit(target)
                elif isinstance(target, (bool, int, float, str, triton.language.constexpr)):
                    parts[f"{name}:{global_name}"] = repr(target)

    visit(kernel)
    return hashlib.sha256(json.dumps(sorted(parts.items())).encode()).hexdigest()


class Tuner:
    """Picks one kernel's configuration per shape-class key (see the module docstring).

    ``name`` identifies the kernel in the cache; the hash of ``kernel``'s source (when
    given) is part of every cache key, so a changed kernel never reuses old timings.
    ``time_config`` times one launch configuration (default: ``do_bench``'s median).
    ``slow_s``: the seconds beyond which a tuning is announced at WARNING (the first
    such tuning of the process only).
    """

    def __init__(self, name: str, kernel=None, time_config: Callable[[Callable[[], object]], float] = _median_ms,
                 slow_s: float = SLOW_TUNING_S):
        self.name = name
        self.kernel = kernel
        self.time_config = time_config
        self.slow_s = slow_s
        self._memo: dict[tuple, dict] = {}
        self._tuning = threading.Lock()
        self._version: str | None = None

    @property
    def version(self) -> str:
        """The kernel's part of every cache key: ``source_version`` (cached per Tuner)."""
        if self._version is None:
            self._version = source_version(self.kernel)
        return self._version

    def forget(self) -> None:
        """Forget what this process has tuned (the cache file stays)."""
        self._memo.clear()

    def chosen(self, device_name: str, key: tuple) -> dict | None:
        """The configuration already chosen for ``key`` (``pick``'s answer on every call
        after the first), or None: not chosen yet, or none could run (``pick`` says so)."""
        chosen = self._memo.get((device_name, key))
        return None if chosen is _NONE_RAN else chosen

    def pick(self, device_name: str, key: tuple, candidates: Callable[[], list[dict]],
             launch: Callable[[dict], torch.Tensor | None], tune: bool | None = None,
             compile: Callable[[dict], Compiled | None] | None = None,
             clock: Callable[[Callable[[], object]], float] | None = None, variants: tuple = ()) -> dict:
        """The configuration for ``key`` among ``candidates()`` (pruned and ranked best
        first; built only on a key's first call, so that later calls cost one dictionary
        lookup).  ``launch(config)`` runs the kernel with one configuration and returns
        the tensor it wrote (or ``None``); it must be safe to repeat.  ``compile(config)``
        compiles one without running it (``None``: compiling happens at the first
        launch); ``clock`` times a launch (default ``time_config``).  ``tune`` defaults
        to "not in the interpreter and ``TRITONDECONV_AUTOTUNE`` is not 0".  ``variants``:
        the compile-time constants that select the kernel's variants (``first_timed``).

        Only the first call of a key takes the tuner's lock: a thread launching a tuned
        key never waits behind another thread's tuning."""
        memo_key = (device_name, key)
        chosen = self._memo.get(memo_key)
        if chosen is None:
            with self._tuning:
                chosen = self._memo.get(memo_key)
                if chosen is None:
                    chosen = self._choose(device_name, key, candidates(), launch, tune, compile,
                                          clock or self.time_config, variants)
        if chosen is _NONE_RAN:
            raise NoConfigurationRan(f"tritondeconv: no configuration of {self.name} could run for shape class {key}")
        return chosen

    def _choose(self, device_name, key, candidates, launch, tune, compile, clock, variants) -> dict:
        mode = autotune_mode()
        if tune is None:
            tune = mode != "0" and not INTERPRETING
        if not tune or len(candidates) == 1:
            self._memo[(device_name, key)] = candidates[0]
            return candidates[0]
        cache = CacheFile(cache_path(device_name))
        entry_key = json.dumps([self.name, self.version, *key], default=str)  # (a dtype in a key as its name)
        shipped = shipped_path(device_name)
        for source in [cache] if shipped is None else [cache, CacheFile(shipped, shipped=True)]:
            recorded = source.read().get(entry_key)
            if isinstance(recorded, dict) and recorded.get("config") in candidates:
                self._memo[(device_name, key)] = recorded["config"]
                return recorded["config"]
        if capturing():
            warnings.warn(
                f"tritondeconv: {self.name} for shape class {key} is first called during CUDA-graph capture, where "
                "nothing can be timed: the graph keeps an untuned configuration; call the model once before capturing",
                stacklevel=2)
            return candidates[0]

        start = time.perf_counter()
        timed = candidates if mode == "exhaustive" else first_timed(candidates, variants)
        trials = self._compile_all(timed, compile, key)
        for trial in trials:
            if not trial.note:
                trial.ms = self._time(launch, trial, key, clock)
        ran = [t for t in trials if not math.isinf(t.ms)]
        if not ran:  # remembered: later calls of the key go to aten without trying again
            self._memo[(device_name, key)] = _NONE_RAN
            return _NONE_RAN
        chosen = min(ran, key=lambda t: t.ms).config
        # The first tuning of a key checks the winner against the cost model's pick that ran.
        if chosen != ran[0].config and not self._agrees(launch, ran[0].config, chosen):
            LOG.warning("tritondeconv: %s candidate %s disagrees with %s for shape class %s; keeping %s", self.name,
                        _describe(chosen), _describe(ran[0].config), key, _describe(ran[0].config))
            chosen = ran[0].config
        seconds = time.perf_counter() - start
        best_ms = min(t.ms for t in ran if t.config == chosen)
        cache.update({entry_key: {"config": chosen, "ms": best_ms, "tuning_s": round(seconds, 3)}})
        TUNING_LOG.append(Tuning(self.name, key, chosen, seconds, len(candidates), trials, variants))
        LOG.info("tritondeconv: tuned %s for shape class %s in %.2f s (%d of %d candidates timed): %s; chose %s",
                 self.name, key, seconds, len(ran), len(candidates), "; ".join(_describe_trial(t) for t in trials),
                 _describe(chosen))
        if seconds > self.slow_s:
            _announce_slow(self.name, key, len(ran), len(candidates), seconds, cache.path)
        self._memo[(device_name, key)] = chosen
        return chosen

    def _compile_all(self, configs: list[dict], compile, key: tuple) -> list[Trial]:
        """Compile every candidate at once (a thread each, up to the host's cores: the
        compiler releases the GIL), before anything is timed.  A candidate that fails to
        compile is dropped; so is one that spills registers, unless every one does
        (then those that spill least stay)."""
        if compile is None:
            return [Trial(c, None, math.inf) for c in configs]

        def timed_compile(config: dict):
            start = time.perf_counter()
            try:
                return compile(config), time.perf_counter() - start
            except Exception as error:  # noqa: BLE001 (a failure only removes this candidate)
                return error, time.perf_counter() - start

        with ThreadPoolExecutor(max_workers=max(1, min(len(configs), os.cpu_count() or 1))) as pool:
            results = list(pool.map(timed_compile, configs))
        trials = []
        for config, (result, seconds) in zip(configs, results):
            trial = Trial(config, seconds, math.inf)
            if isinstance(result, Exception):
                trial.note = f"failed to compile: {type(result).__name__}: {_first_line(result)}"
                LOG.warning("tritondeconv: %s candidate %s skipped for shape class %s: %s", self.name,
                            _describe(config), key, trial.note)
            trials.append(trial)
        if all(isinstance(result, Exception) for result, _ in results):
            # A compile step failing for every candidate says more about the step (an API
            # that moved) than about the candidates: time them all, each compiled at launch.
            LOG.warning("tritondeconv: %s: compiling ahead failed for every candidate of shape class %s; "
                        "timing them as launched", self.name, key)
            return [Trial(c, None, math.inf) for c in configs]
        compiled = [(t, r.n_spills) for t, (r, _) in zip(trials, results) if isinstance(r, Compiled)]
        least = min((n for _, n in compiled), default=0)
        for trial, spills in compiled:
            if spills > least:
                trial.note = f"spills {spills} registers"
        return trials

    def _time(self, launch, trial: Trial, key: tuple, clock) -> float:
        """Median milliseconds of one candidate; infinite if it fails in any way (does not
        compile, does not fit the GPU, raises at launch), which is logged."""
        try:
            return clock(lambda: launch(trial.config))
        except Exception as error:  # noqa: BLE001 (any failure only removes this candidate)
            trial.note = f"failed: {type(error).__name__}: {_first_line(error)}"
            LOG.warning("tritondeconv: %s candidate %s skipped for shape class %s: %s", self.name,
                        _describe(trial.config), key, trial.note)
            return math.inf

    @staticmethod
    def _agrees(launch, reference: dict, other: dict) -> bool:
        """Whether ``other``'s output agrees with ``reference``'s (``True`` when the launch
        returns nothing to compare)."""
        expected = launch(reference)
        if not isinstance(expected, torch.Tensor):
            return True
        expected = expected.clone()
        return agree(expected, launch(other))


_ANNOUNCED = threading.Lock()  # taken by the first slow tuning's announcement and kept: once per process


def _announce_slow(name: str, key: tuple, timed: int, candidates: int, seconds: float, path: Path) -> None:
    """Say at WARNING, the first time in the process, that a first call tuned slowly."""
    if not _ANNOUNCED.acquire(blocking=False):
        return
    dtype = next((f" ({k.removeprefix('torch.')})" for k in key if isinstance(k, str) and k.startswith("torch.")), "")
    LOG.warning(
        "tritondeconv: the first call of %s%s for shape class %s spent %.1f s tuning (%d of %d candidates timed); "
        "the result is cached in %s for later calls and processes. To skip tuning: TRITONDECONV_AUTOTUNE=0 (the cost "
        "model's pick, untimed), or tunings shipped for this GPU and Triton version (docs/tunings.md). "
        "Said once per process; TRITONDECONV_LOG=1 logs every tuning.", name, dtype, key, seconds, timed, candidates,
        path)


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def _describe_trial(trial: Trial) -> str:
    compiled = f", compiled in {trial.compile_s:.2f} s" if trial.compile_s is not None else ""
    outcome = trial.note or f"{trial.ms:.4f} ms"
    return f"{_describe(trial.config)}: {outcome}{compiled}"
