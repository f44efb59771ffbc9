"""Choosing a kernel's tile configuration: pruning, timing, and a tuning cache on disk.

Each launcher asks its ``Tuner`` for a configuration under a *shape-class key* it builds
itself (the things that change which tile is fastest: channels, taps, strides, dtype,
layout, a bucketed row count), from candidates its kernel family lists and ``prune``
trims to the problem and the GPU.  The tuner answers, in order:

1. from memory, if this process has tuned the key already;
2. with the first candidate, untimed, when there is nothing to time: in the Triton
   interpreter (it cannot time anything), with ``TRITONDECONV_AUTOTUNE=0`` (the
   candidates are listed best-first, so the first one that survives pruning is the
   heuristic choice), or when only one candidate survives;
3. from the cache file of this GPU model and Triton version, when it holds an entry for
   the key whose configuration is still a candidate (otherwise the entry is stale);
4. with the first candidate, untimed and not remembered, during CUDA-graph capture
   (nothing can be timed there), with a warning that asks for a warm-up call before
   capturing;
5. by timing every candidate (median of ``triton.testing.do_bench``), keeping the fastest
   and writing it to the cache file.  A candidate that fails in any way (compile,
   resources, launch) is skipped and logged; when none runs, ``NoConfigurationRan`` is
   raised, which the op layer answers with aten's result and one warning.

The cache file lives in ``$TRITONDECONV_CACHE_DIR`` (default ``~/.cache/tritondeconv``),
one JSON file per (GPU name, Triton version).  A file that cannot be read or parsed is
ignored (with a warning) and replaced at the next write.  Writes merge with what is on
disk under an exclusive lock and land through an atomic rename, so processes tuning at
the same time never leave a torn file or drop each other's entries.  Every tuning done
by this process is appended to ``TUNING_LOG`` (with the seconds it took and each
candidate's time), which ``tuning_report()`` returns and ``perf/bench.py`` reports;
with ``TRITONDECONV_LOG=1`` (or the ``tritondeconv`` logger at INFO) each tuning is
logged as it happens, as ``TRITON_PRINT_AUTOTUNING`` does for ``triton.autotune``.

Why not ``triton.autotune``: its key is a list of argument values (it cannot express a
layout or a bucket without extra kernel arguments), and its on-disk cache raises on a
corrupt file.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
from .common import AUTOTUNE, INTERPRETING

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


def prune(candidates: list[dict], m: int, n: int, k: int, element_size: int, shared_memory: int | None) -> list[dict]:
    """The candidates that fit the problem and the GPU, in their given order.

    For a GEMM of ``m`` rows, ``n`` columns and a reduction of ``k`` (per step), drop
    tiles larger than the problem rounds up to (a 128-wide column tile for 3 output
    channels is 97% waste), never below the smallest tile on offer; and drop tiles whose
    pipelined operands (``num_stages`` copies of the A and B tiles) exceed the GPU's
    shared memory (``None``: unknown, keep).  Never returns an empty list: if nothing
    fits, the smallest candidate.
    """
    def fits(c: dict) -> bool:
        for block, size in (("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_K", k)):
            smallest = min(d[block] for d in candidates)
            if c[block] > max(smallest, triton.next_power_of_2(size)):
                return False
        tiles = (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]) * element_size
        return shared_memory is None or c["num_stages"] * tiles <= shared_memory

    kept = [c for c in candidates if fits(c)]
    return kept or [min(candidates, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] * c["num_stages"])]


def bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two: image sizes within a factor of two share
    one tuning instead of retuning for every resolution."""
    return triton.next_power_of_2(max(rows, 1))


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> tuple[str, int | None]:
    """The device's name (the cache file is per GPU model) and its shared memory per
    block in bytes (``None`` where unknown: on the CPU, under the interpreter)."""
    if device.type != "cuda":
        return device.type, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = triton.runtime.driver.active.utils.get_device_properties(index)
    return torch.cuda.get_device_name(index), properties["max_shared_mem"]


def cache_dir() -> Path:
    return Path(os.environ.get("TRITONDECONV_CACHE_DIR") or Path.home() / ".cache" / "tritondeconv")


def cache_path(device_name: str) -> Path:
    """The cache file for a GPU model and this Triton version."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name)
    return cache_dir() / f"tuning-{slug}-triton{triton.__version__}.json"


@dataclass
class Tuning:
    """One tuning done by this process (an entry of ``TUNING_LOG``): the key, the winner,
    the seconds the whole tuning took, how many candidates it had, and each candidate's
    median milliseconds (``inf`` where it could not run)."""
    kernel: str
    key: tuple
    config: dict
    seconds: float
    candidates: int
    timings: list[tuple[dict, float]]


TUNING_LOG: list[Tuning] = []


def tuning_report() -> list[Tuning]:
    """What this process has tuned, in order (a copy of ``TUNING_LOG``)."""
    return list(TUNING_LOG)


def _describe(config: dict) -> str:
    return f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"


class CacheFile:
    """The JSON tuning cache of one GPU model: ``{"format": FORMAT, "entries": {key: {"config": ..., "ms": ...}}}``."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        """The entries on disk; ``{}`` if there is no file, and ``{}`` with a warning if
        it cannot be read, is not JSON, or has another format (it will be rebuilt)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            warnings.warn(f"tritondeconv: ignoring unreadable tuning cache {self.path}: {error}")
            return {}
        try:
            data = json.loads(raw.decode())
            entries = data["entries"] if data.get("format") == FORMAT else None
        except (ValueError, AttributeError, KeyError, TypeError):
            entries = None
        if not isinstance(entries, dict):
            warnings.warn(f"tritondeconv: ignoring corrupt or outdated tuning cache {self.path}; it will be rebuilt")
            return {}
        return entries

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
                entries = self.read()
                entries.update(new)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as error:
            warnings.warn(f"tritondeconv: cannot write tuning cache {self.path}: {error}")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _median_ms(launch: Callable[[], None]) -> float:
    return triton.testing.do_bench(launch, warmup=5, rep=20, return_mode="median")


class Tuner:
    """Picks one kernel's configuration per shape-class key (see the module docstring).

    ``name`` identifies the kernel in the cache; the hash of ``kernel``'s source (when
    given) is part of every cache key, so a changed kernel never reuses old timings.
    ``time_config`` times one launch configuration (default: ``do_bench``'s median).
    """

    def __init__(self, name: str, kernel=None, time_config: Callable[[Callable[[], None]], float] = _median_ms):
        self.name = name
        self.kernel = kernel
        self.time_config = time_config
        self._memo: dict[tuple, dict] = {}

    @property
    def version(self) -> str:
        return self.kernel.cache_key if self.kernel is not None else ""

    def pick(self, device_name: str, key: tuple, candidates: Callable[[], list[dict]],
             launch: Callable[[dict], None], tune: bool | None = None) -> dict:
        """The configuration for ``key`` among ``candidates()`` (pruned, best first; the
        same list for the same device and key, and built only on a key's first call, so
        that later calls cost one dictionary lookup).  ``launch(config)`` runs the
        kernel with one configuration (it must be safe to repeat: it is timed several
        times).  ``tune`` defaults to "not in the interpreter and TRITONDECONV_AUTOTUNE
        is not 0"."""
        if tune is None:
            tune = AUTOTUNE and not INTERPRETING
        memo_key = (device_name, key)
        if memo_key in self._memo:
            return self._memo[memo_key]
        candidates = candidates()
        if not tune or len(candidates) == 1:
            self._memo[memo_key] = candidates[0]
            return candidates[0]
        cache = CacheFile(cache_path(device_name))
        entry_key = json.dumps([self.name, self.version, *key])
        cached = cache.read().get(entry_key)
        if isinstance(cached, dict) and cached.get("config") in candidates:
            self._memo[memo_key] = cached["config"]
            return cached["config"]
        if _capturing():
            warnings.warn(
                f"tritondeconv: {self.name} for shape class {key} is first called during CUDA-graph capture, where "
                "nothing can be timed: the graph keeps an untuned configuration; call the model once before capturing")
            return candidates[0]

        start = time.perf_counter()
        timings = [(c, self._time(launch, c, key)) for c in candidates]
        chosen, best_ms = min(timings, key=lambda t: t[1])
        seconds = time.perf_counter() - start
        if math.isinf(best_ms):
            raise NoConfigurationRan(f"tritondeconv: no configuration of {self.name} could run for shape class {key}")
        cache.update({entry_key: {"config": chosen, "ms": best_ms, "tuning_s": round(seconds, 3)}})
        TUNING_LOG.append(Tuning(self.name, key, chosen, seconds, len(candidates), timings))
        LOG.info("tritondeconv: tuned %s for shape class %s in %.2f s: %s; chose %s", self.name, key, seconds,
                 ", ".join(f"{_describe(c)} {ms:.4f} ms" for c, ms in timings), _describe(chosen))
        self._memo[memo_key] = chosen
        return chosen

    def _time(self, launch: Callable[[dict], None], candidate: dict, key: tuple) -> float:
        """Median milliseconds of one candidate; infinite if it fails in any way (does not
        compile, does not fit the GPU, raises at launch), which is logged."""
        try:
            return self.time_config(lambda: launch(candidate))
        except Exception as error:  # noqa: BLE001 (any failure only removes this candidate)
            LOG.warning("tritondeconv: %s candidate %s skipped for shape class %s: %s: %s", self.name,
                        _describe(candidate), key, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return math.inf
