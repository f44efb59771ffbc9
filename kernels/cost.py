"""A static cost model of a tile configuration: which few candidates are worth timing.

Timing a candidate on a first call costs its compilation (about a second on the host)
plus its runs; most candidates of a list are plainly wrong for a given shape (a
128-wide tile over 3 output channels, 256-row tiles for 200 rows, one wave that fills a
tenth of the GPU).  ``estimate`` predicts a candidate's time from what can be known
without running it, and the tuner times only the best few (``tuning.TIMED``).

The model, per launch (all in SM clock cycles; only the ranking matters):

* **Work with padding.**  Each GEMM part is cut into tiles of ``BLOCK_M × BLOCK_N``; a
  tile runs ``taps × ceil(depth / BLOCK_K)`` reduction steps.  Rows, columns and the
  reduction padded up to the tile are paid for as if they were real, and so are the
  phases with fewer taps (they are simply shorter).
* **One step's cost**: its multiplications (``BLOCK_M·BLOCK_N·BLOCK_K`` at the path's
  rate: tensor cores by dtype, or FMA lanes; a tensor-core tile under 64 rows leaves
  part of a Hopper warpgroup MMA idle) and its loads (the A and B tiles,
  ``(BLOCK_M + BLOCK_N)·BLOCK_K`` elements, at a rate that stands for L2 bandwidth and
  the address arithmetic of an implicit GEMM), plus a fixed per-step overhead.  On
  tensor cores the two overlap (the larger counts); on the FMA path they add up.
* **Waves.**  Each SM runs ``ceil(programs / SMs)`` tiles, one after another in
  throughput terms (tiles resident side by side share the SM): a launch of too few
  tiles leaves SMs idle, and a last partial wave costs a whole tile-time.  An SM with
  fewer than 8 warps resident (bounded by shared memory for the pipeline's stages, by
  warps, by registers, and by the tiles it has) leaves load latency exposed.
* **Spills.**  A tile whose accumulator and operands need more than 255 registers per
  thread will spill; it is ranked last (the tuner drops a candidate that the compiler
  reports spilling anyway).

The rates are an H100's (per SM per clock); on another GPU only the SM count and the
shared memory change.  The model is a ranking heuristic, checked on a GPU by timing the
whole list (``TRITONDECONV_AUTOTUNE=exhaustive``) and comparing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import triton

from . import tiles

# Multiply-adds per SM per clock on each path (H100 SXM: 989 dense bf16 TFLOPS at
# 1.83 GHz over 132 SMs is ~2048; TF32 half of that; FP64 tensor cores ~128; FP32 FMA
# 128 lanes, FP64 FMA 64 lanes).  A ``tl.dot`` of fp32 at "ieee" precision runs on the
# FMA lanes.
DOT_RATE = {"float16": 2048, "bfloat16": 2048, "tf32": 1024, "float32": 128, "float64": 128}
FMA_RATE = {"float64": 64}
FMA_RATE_DEFAULT = 128
# The FMA path multiplies a broadcast product cube and sums it: about half the lanes' peak.
FMA_EFFICIENCY = 0.5
# Elements of the A and B tiles one SM brings in per clock: L2 bandwidth (~40 B/clk/SM)
# and the index arithmetic of the gathered loads, whichever is slower.
LOAD_RATE = 16
STEP_OVERHEAD = 40  # cycles per reduction step: loop control, masks, pipeline bookkeeping
WARPGROUP_ROWS = 64  # a Hopper tensor-core MMA spans 64 rows per warpgroup
MAX_WARPS_PER_SM = 64
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
SPILL_PENALTY = 8.0
LATENCY_WARPS = 8  # two warps per scheduler hide most of a load's latency


@dataclass(frozen=True)
class Part:
    """``count`` independent GEMMs of ``rows × columns``, each reducing over ``taps``
    blocks of ``depth`` (a block is padded up to ``BLOCK_K`` on its own): one stride
    phase of one group (taps = the phase's kernel taps, depth = channels), or the weight
    gradient of one group and pixel range (columns = taps × output channels, taps = 1,
    depth = pixels)."""
    count: int
    rows: int
    columns: int
    depth: int
    taps: int


@dataclass(frozen=True)
class Problem:
    """What one launch computes, for the cost model: its GEMM parts, the operands'
    element size and dtype name (``"float16"``, ..., ``"tf32"`` for fp32 with TF32),
    which two tile sides must be at least ``tiles.DOT_MIN`` for the tile to run on
    tensor cores (the family's ``tiles.*_DOT_SIDES``), and
    the kernel's variants that cut the same work into other GEMMs: ``(constant, parts)``
    pairs, a configuration that sets that compile-time constant computing ``parts``."""
    parts: tuple[Part, ...]
    element_size: int
    dtype: str
    dot_sides: tuple[str, str]
    variants: tuple[tuple[str, tuple[Part, ...]], ...] = ()

    def parts_of(self, config: dict) -> tuple[Part, ...]:
        """The GEMM parts ``config`` computes."""
        return next((parts for constant, parts in self.variants if config.get(constant)), self.parts)


@dataclass(frozen=True)
class Machine:
    """The GPU as the model needs it: SMs and shared memory per SM in bytes."""
    sms: int
    shared_memory: int


def uses_dot(config: dict, problem: Problem) -> bool:
    """Whether ``config`` multiplies on tensor cores (``tiles.uses_dot``: ``tl.dot``
    needs ``tiles.DOT_MIN`` a side)."""
    return tiles.uses_dot(config, problem.dot_sides)


def registers_per_thread(config: dict, problem: Problem) -> float:
    """Estimated registers per thread: the fp32 (or fp64) accumulator tile spread over the
    program's threads, plus one stage of operand tiles, plus ~32 for indices."""
    threads = 32 * config["num_warps"]
    acc_words = 2 if problem.dtype == "float64" else 1
    accumulator = config["BLOCK_M"] * config["BLOCK_N"] * acc_words / threads
    operands = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * problem.element_size / 4 / threads
    if not uses_dot(config, problem):  # the FMA path holds its whole product cube
        operands += config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"] * acc_words / threads
    return accumulator + operands + 32


def resident_programs(config: dict, problem: Problem, machine: Machine) -> int:
    """Programs of this configuration one SM holds at once (at least 1)."""
    tile_bytes = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * problem.element_size
    by_shared = machine.shared_memory // max(config["num_stages"] * tile_bytes, 1)
    by_warps = MAX_WARPS_PER_SM // config["num_warps"]
    registers = min(registers_per_thread(config, problem), MAX_REGISTERS_PER_THREAD)
    by_registers = REGISTERS_PER_SM // int(registers * 32 * config["num_warps"])
    return max(1, min(by_shared, by_warps, by_registers))


def step_cycles(config: dict, problem: Problem) -> float:
    """Cycles of one reduction step of one tile on an otherwise idle SM.  On tensor cores
    the loads (asynchronous copies) overlap the MMAs: the slower of the two counts.  On
    the FMA path the same lanes compute the addresses, load and multiply: both count."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    loads = (bm + bn) * bk / LOAD_RATE
    if uses_dot(config, problem):
        multiplies = bm * bn * bk / (DOT_RATE[problem.dtype] * min(1.0, bm / WARPGROUP_ROWS))
        return max(multiplies, loads) + STEP_OVERHEAD
    multiplies = bm * bn * bk / (FMA_RATE.get(problem.dtype, FMA_RATE_DEFAULT) * FMA_EFFICIENCY)
    return multiplies + loads + STEP_OVERHEAD


def estimate(config: dict, problem: Problem, machine: Machine) -> float:
    """Predicted cycles of the launch with ``config`` (see the module docstring)."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    step = step_cycles(config, problem)
    parts = problem.parts_of(config)
    programs = sum(p.count * math.ceil(p.rows / bm) * math.ceil(p.columns / bn) for p in parts)
    busy = sum(p.count * math.ceil(p.rows / bm) * math.ceil(p.columns / bn) * p.taps * math.ceil(p.depth / bk)
               for p in parts) * step
    # Each SM gets ceil(programs / SMs) programs (the last wave pays in full however few
    # it holds); programs resident side by side share the SM, so they add up.
    per_sm = math.ceil(programs / machine.sms)
    cycles = per_sm * busy / max(programs, 1)
    # Fewer than LATENCY_WARPS warps on an SM leave its load latency exposed.
    warps = min(resident_programs(config, problem, machine), per_sm) * config["num_warps"]
    cycles *= max(1.0, LATENCY_WARPS / warps)
    if registers_per_thread(config, problem) > MAX_REGISTERS_PER_THREAD:
        cycles *= SPILL_PENALTY
    return cycles


def prune(candidates: list[dict], problem: Problem, shared_memory: int | None) -> list[dict]:
    """The candidates that fit the problem and the GPU, in their given order.

    Drop tiles larger than the problem rounds up to (a 128-wide column tile for 3 output
    channels is 97% waste), never below the smallest tile of the same path (tensor-core
    tiles are at least 16 a side, so a 3-channel layer keeps its 16-wide tensor-core
    tiles beside its 4-wide FMA tiles; each variant by its own GEMMs); and drop tiles
    whose pipelined operands (``num_stages`` copies of the A and B tiles) exceed the
    GPU's shared memory (``None``: unknown, keep).  Never returns an empty list: if
    nothing fits, the smallest candidate.
    """
    # Per path (tensor cores or not) and variant (its GEMMs), the largest tile side the
    # problem needs, never below the path's smallest.
    def path(c: dict) -> tuple:
        return uses_dot(c, problem), problem.parts_of(c)

    same_path: dict[tuple, list[dict]] = {}
    for c in candidates:
        same_path.setdefault(path(c), []).append(c)
    limits = {}
    for key, same in same_path.items():
        parts = key[1]
        sizes = {"BLOCK_M": max(p.rows for p in parts), "BLOCK_N": max(p.columns for p in parts),
                 "BLOCK_K": max(p.depth for p in parts)}
        limits[key] = {block: max(min(d[block] for d in same), triton.next_power_of_2(size))
                       for block, size in sizes.items()}

    def fits(c: dict) -> bool:
        if any(c[block] > limit for block, limit in limits[path(c)].items()):
            return False
        tiles = (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * problem.element_size
        return shared_memory is None or c["num_stages"] * tiles <= shared_memory

    kept = [c for c in candidates if fits(c)]
    return kept or [min(candidates, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] * c["num_stages"])]


def rank(candidates: list[dict], problem: Problem, machine: Machine | None) -> list[dict]:
    """``candidates`` from the cheapest predicted to the dearest (stable: equal
    predictions keep the list's order); unchanged when the machine is unknown."""
    if machine is None:
        return list(candidates)
    return sorted(candidates, key=lambda c: estimate(c, problem, machine))
