"""Launching a kernel, for every kernel family: candidates → prune → rank → tuned pick →
launch → observers; and the seam through which tests and tools take part.

A kernel's launcher (``phase_gemm.phase_gemm``, ``weight_grad.weight_grad``) checks
nothing and decides nothing about tiles: it describes the launch as a ``Request`` (the
kernel, its runtime arguments and constants, its grid, its tuning key, its candidate
table and the GEMMs it computes for the cost model) and calls ``launch``.

The seam, ``intercept``: inside ``with intercept(...)`` the hooks given replace, for
every launch of every kernel family (innermost ``intercept`` first),

* ``choose(request, candidates) -> config``: the tuner (``candidates`` pruned and
  ranked as the tuner would see them);
* ``launch(request, config)``: the Triton launch itself (the tuner's timing runs
  included; ``run_kernel`` is the real one); while it is in force the ops take the
  kernel path on any device;
* ``compile(request, config) -> tuning.Compiled``: compiling a candidate before timing;
* ``clock(run) -> milliseconds``: timing a candidate;
* ``tune``: whether first calls tune (``True`` also in the interpreter);
* ``device``: the GPU's description (``DeviceInfo``) for the cost model and pruning;
* ``only``: ``((constant, on), ...)``: a launch whose candidates include configurations
  that set each of those compile-time constants (``on``; a kernel variant such as
  ``ONE_GEMM``) or leave it unset or 0 (not ``on``) takes one of those, tuned among them
  alone under its own key (so that a benchmark can time each variant, tuned, beside the
  tuner's pick); likewise a ``race`` between ways of computing a result keeps the runs
  so named (``(("staged", True),)``: the phase GEMM on a channels-last copy of its input).

Tests use it to see or force a configuration and to inject faults; ``perf/`` uses it
to record launches for the static compile report and to stub launches when measuring
host overhead.  ``common.observe_launches`` sees the launches that computed a result.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton import knobs
from triton.compiler import CompiledKernel

from .common import EPOCH, INTERPRETING, OBSERVERS, notify_launch
from .cost import Machine, Problem, prune, rank
from .tuning import Compiled, Tuner


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch needs besides the tensors' addresses (and the activation's slope),
    for one class of calls: the same shapes, strides and dtype, geometry and epilogue.
    Each kernel family computes it once per class (its ``plan_launch``, cached)."""

    scalars: tuple  # the kernel's arguments after the tensor pointers
    constants: dict  # its compile-time constants, the tile configuration aside
    grid: Callable[[dict], tuple]
    key: tuple  # the tuning key
    configs: Callable[[], list[dict]]  # the candidate table
    problem: Callable[[], Problem]  # the GEMMs the launch computes, for the cost model
    # The compile-time constants that select the kernel's variants (a first call times the
    # best candidates of each: ``tuning.first_timed``).
    variants: tuple = ()
    # The configurations chosen for this class's launches, by device and hooks (``launch``
    # keeps the tuner's answers here), and the races decided for its calls (``race``'s
    # answers, kept where the caller passes this as ``decided``).
    tuned: dict = field(default_factory=dict, compare=False, repr=False)
    raced: dict = field(default_factory=dict, compare=False, repr=False)

    def request(self, family: str, kernel, tensors: tuple, device: torch.device, output: torch.Tensor,
                trailing: tuple = ()) -> Request:
        """The ``Request`` of one call of this class: the kernel's arguments are
        ``tensors`` (its pointers, ``None`` for an absent one), the plan's ``scalars``,
        then ``trailing`` (per-call values, such as the activation's slope)."""
        return Request(family, kernel, (*tensors, *self.scalars, *trailing), self.constants, self.grid, self.key,
                       self.configs, self.problem, device, output, self.variants, len(tensors), self.tuned)


@dataclass(frozen=True)
class DeviceInfo:
    """A device as tuning sees it: its name (the tuning cache is per GPU model), its
    shared memory per block in bytes, its SM count and its compute capability (``None``
    where unknown: on the CPU, under the interpreter)."""
    name: str
    shared_memory: int | None = None
    sms: int | None = None
    capability: tuple[int, int] | None = None

    @property
    def machine(self) -> Machine | None:
        return Machine(self.sms, self.shared_memory) if self.sms and self.shared_memory else None


# An H100 SXM as the tools that prune and rank without a GPU describe it (the static
# compile report, the candidate counts, the tune-check rehearsal, the cost-model tests).
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", shared_memory=232448, sms=132, capability=(9, 0))


@functools.cache
def _described(device: torch.device) -> DeviceInfo:
    """``device`` as tuning sees it (``device_info`` without the hook)."""
    if device.type != "cuda":
        return DeviceInfo(device.type)
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = triton.runtime.driver.active.utils.get_device_properties(index)
    return DeviceInfo(torch.cuda.get_device_name(index), properties["max_shared_mem"],
                      properties["multiprocessor_count"], torch.cuda.get_device_capability(index))


@dataclass
class Request:
    """One launch as a kernel's launcher describes it.

    family:    the kernel family (``"phase_gemm"``, ``"weight_grad"``, ``"split_sum"``,
               ``"staging"``): names its tuner.
    kernel:    the ``@triton.jit`` function.
    args:      its runtime arguments, in its signature's order (the first: the input).
    constants: its compile-time constants other than the tile configuration.
    grid:      ``grid(config) -> (x, y, z)``.
    key:       the shape class a tuning is kept for (built and documented by the family).
    configs:   ``configs() -> list[dict]``: the family's candidate table for this shape.
    problem:   ``problem() -> cost.Problem``: the GEMMs the launch computes (for pruning
               and the cost model; built only on a key's first call).
    device:    the tensors' device.
    output:    the tensor a launch writes (compared when the tuner checks its winner).
    variants:  the compile-time constants that select the kernel's variants.
    pointers:  how many of ``args`` are tensors (they come first).
    tuned:     the plan's chosen configurations (``LaunchPlan.tuned``; ``None``: none kept).
    """
    family: str
    kernel: object
    args: tuple
    constants: dict
    grid: Callable[[dict], tuple]
    key: tuple
    configs: Callable[[], list[dict]]
    problem: Callable[[], Problem]
    device: torch.device
    output: torch.Tensor
    variants: tuple = ()
    pointers: int = 0
    tuned: dict | None = None


@dataclass
class _Hooks:
    choose: Callable | None = None
    launch: Callable | None = None
    compile: Callable | None = None
    clock: Callable | None = None
    tune: bool | None = None
    device: DeviceInfo | None = None
    only: tuple | None = None


_NO_HOOKS = _Hooks()
_HOOKS: list[_Hooks] = []  # per open intercept, the hooks in force inside it (merged with the enclosing ones)


@contextlib.contextmanager
def intercept(*, choose=None, launch=None, compile=None, clock=None, tune=None, device=None,
              only=None) -> Iterator[None]:
    """Replace parts of every launch while the block runs (see the module docstring)."""
    given = _Hooks(choose, launch, compile, clock, tune, device, only)
    outer = _hooks()
    _HOOKS.append(_Hooks(**{name: getattr(given, name) if getattr(given, name) is not None else getattr(outer, name)
                            for name in _Hooks.__dataclass_fields__}))
    EPOCH[0] += 1
    try:
        yield
    finally:
        _HOOKS.pop()
        EPOCH[0] += 1



def _hooks() -> _Hooks:
    """The hooks in force: for each part, the innermost ``intercept`` that sets it."""
    return _HOOKS[-1] if _HOOKS else _NO_HOOKS


def _hook(name: str):
    return getattr(_hooks(), name)


def launches_replaced() -> bool:
    """Whether an ``intercept`` replaces the launches, or ``stub_launches`` stubs them
    (then any device takes the kernel path)."""
    return _hook("launch") is not None or bool(_STUBBED)


def device_info(device: torch.device, hooks: _Hooks | None = None) -> DeviceInfo:
    """``device`` as tuning sees it, or the ``device`` hook's description where one is in
    force (``hooks``: the hooks in force, where the caller has read them already)."""
    return (hooks or _hooks()).device or _described(device)


_TUNERS: dict[str, Tuner] = {}


def tuner(family: str, kernel=None) -> Tuner:
    """The tuner of a kernel family (made at its first launch)."""
    if family not in _TUNERS:
        _TUNERS[family] = Tuner(family, kernel)
    return _TUNERS[family]


# Counts the calls of ``forget_tunings``: an answer kept outside the tuners (a launch
# plan's ``tuned`` and ``raced``) holds only within the count it was decided in.
_FORGOTTEN = [0]


def forget_tunings() -> None:
    """Forget every configuration this process has tuned (the cache file stays)."""
    for t in _TUNERS.values():
        t.forget()
    _FORGOTTEN[0] += 1
    EPOCH[0] += 1


def _kept(answers: dict | None, hooks: _Hooks, device: torch.device):
    """The answer kept in ``answers`` (a plan's ``tuned`` or ``raced``) for this device
    and these hooks since the last ``forget_tunings``, or None.  A repeated call of a
    class costs this small lookup instead of the tuner's, which hashes the whole key."""
    kept = answers.get((device, hooks.device, hooks.only)) if answers is not None else None
    return kept[1] if kept is not None and kept[0] == _FORGOTTEN[0] else None


def _keep(answers: dict | None, hooks: _Hooks, device: torch.device, answer) -> None:
    """Keep ``answer`` in ``answers`` (see ``_kept``); the caller has checked that the
    tuner keeps it too (a capture's untimed pick is not kept)."""
    if answers is not None:
        answers[(device, hooks.device, hooks.only)] = (_FORGOTTEN[0], answer)


def candidates(request: Request, info: DeviceInfo) -> list[dict]:
    """The request's candidates as the tuner sees them: pruned to the problem and the
    GPU, then ranked by the cost model (cheapest first; unranked where the GPU is unknown);
    only the variant an ``only`` hook asks for, where the request offers it (its other
    entries name what other requests or races choose between).  A kernel with one
    configuration (the weight gradient's split sum, the staging copy) has nothing to
    choose: its ``problem`` is never built."""
    configs = request.configs()
    if len(configs) == 1:
        return configs
    problem = request.problem()
    ranked = rank(prune(configs, problem, info.shared_memory), problem, info.machine)
    only = [(constant, on) for constant, on in _hook("only") or () if constant in request.variants]
    return [c for c in ranked if all(bool(c.get(constant)) == on for constant, on in only)] or ranked


# The Triton interpreter runs a kernel by patching triton.language's functions for the
# duration of the launch, process-wide: two threads interpreting at once break each
# other.  Compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock() if INTERPRETING else contextlib.nullcontext()


def run_kernel(request: Request, config: dict):
    """The Triton launch of ``request`` with ``config`` through Triton's JIT (what a
    ``launch`` hook replaces, and may call itself); the compiled kernel the JIT chose
    (``None`` in the interpreter, which compiles nothing)."""
    with _INTERPRETER_LOCK:
        return request.kernel[request.grid](*request.args, **request.constants, **config)


class PreparedLaunch:
    """One class of calls' launch with everything decided but the tensors: the tuned
    configuration, the grid, every other argument, and (compiled) the kernel Triton's JIT
    chose for them.  ``launch(*tensors)`` launches it on new tensors of the class.

    The lean launch: on a GPU a call goes straight to the compiled kernel's launcher
    (``CompiledKernel.run``, Triton's C launcher) with the tensors' addresses as
    integers and the current stream, as Triton's JIT ends its own launch, without the
    JIT's per-call work (binding and specialising every argument, building its cache key,
    asking the driver for each pointer's attributes).  The compiled kernel is the one the
    JIT would pick while everything the JIT specialises on is unchanged: the plan's
    arguments and the configuration are, by construction; the tensors' dtypes are part
    of the plan; the 16-byte alignment of their addresses is checked on every call, and
    a call with another alignment, or on another current device, goes through the JIT
    (``jit``).  So does a launch where one of Triton's launch hooks (a profiler's) is
    set, and every launch in the interpreter.  Every launch is reported to the observers
    (``common.observe_launches``)."""

    __slots__ = ("kernel", "options", "tail", "grid", "lean", "run", "function", "metadata", "device", "aligned",
                 "all_aligned", "reported")

    def __init__(self, request: Request, config: dict, compiled):
        values = {**request.constants, **config}
        # Nothing of the request's tensors is kept: a prepared launch lives as long as its
        # class, and the first call's tensors (its output, with the autograd graph it
        # leads back into) must not.
        self.kernel = request.kernel
        self.options = {k: v for k, v in config.items() if k not in request.kernel.arg_names}  # (num_warps, ...)
        # Every argument after the tensors, in the signature's order, the compile-time ones included.
        self.tail = (*request.args[request.pointers:],
                     *(values[name] for name in request.kernel.arg_names[len(request.args):]))
        self.grid = (*request.grid(values), 1, 1)[:3]  # (as the JIT completes it)
        self.device = request.device.index
        self.aligned = tuple(t.data_ptr() % 16 == 0 for t in request.args[:request.pointers])
        self.all_aligned = all(self.aligned)
        self.reported = (request.family, request.constants, request.args[0].dtype, config)
        self.run = self.function = self.metadata = None
        if _STUBBED:
            self.lean = _STUBBED[-1]
        elif isinstance(compiled, CompiledKernel):
            self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
            self.lean = self.compiled
        else:
            self.lean = None

    def launch(self, *tensors) -> None:
        """Launch on ``tensors``, in the places (and with the placeholders) of the
        request's."""
        if self.lean is None or knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls:
            self.jit(tensors)
        else:
            pointers = [t.data_ptr() for t in tensors]
            if self.all_aligned:
                merged = 0
                for pointer in pointers:
                    merged |= pointer
                same = merged % 16 == 0
            else:
                same = self.aligned == tuple([pointer % 16 == 0 for pointer in pointers])
            if same:
                self.lean(pointers, tensors)
            else:
                self.jit(tensors)
        if OBSERVERS:
            notify_launch(*self.reported)

    def compiled(self, pointers: list, tensors: tuple) -> None:
        """The compiled kernel's launcher, on the current stream of the tensors' device
        (where they have none, stream 0: CPU tensors, which only a stand-in compiled
        kernel takes, as the tests hand one)."""
        if self.device is None:
            stream = 0
        else:
            device = torch._C._cuda_getDevice()
            if device != self.device:
                self.jit(tensors)
                return
            stream = torch._C._cuda_getCurrentRawStream(device)
        self.run(*self.grid, stream, self.function, self.metadata, None, None, None, *pointers, *self.tail)

    def jit(self, tensors: tuple) -> None:
        """The same launch through Triton's JIT (it picks, or compiles, the kernel for the
        tensors' alignment and the current device)."""
        with _INTERPRETER_LOCK:
            self.kernel[self.grid](*tensors, *self.tail, **self.options)


_STUBBED: list = []  # per open ``stub_launches``, what replaces the compiled kernel's launcher


def _no_launch(pointers: list, tensors: tuple) -> None:
    """What ``stub_launches`` puts in place of the compiled kernel's launcher."""


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """While inside, a launch does everything it does on a GPU except call the compiled
    kernel's launcher (Triton's C launcher, then the driver): configurations are the cost
    model's picks for an H100 where there is no GPU (nothing is timed or compiled), the
    first call of a class of calls launches nothing, and each later one takes the lean
    launch (``PreparedLaunch``) up to that last step, on CPU tensors too; so that tools
    measure the host's part of a call (its time, its Python-level calls) on any machine.
    Entering and leaving starts a new epoch (``EPOCH``): what was prepared inside is never
    used outside."""
    _STUBBED.append(_no_launch)
    EPOCH[0] += 1
    try:
        with intercept(tune=False, device=None if torch.cuda.is_available() else H100):
            yield
    finally:
        _STUBBED.pop()
        EPOCH[0] += 1


def _run(request: Request, config: dict, launch: Callable | None = None) -> torch.Tensor:
    (launch or run_kernel)(request, config)
    return request.output


def _compile(request: Request, config: dict) -> Compiled | None:
    """Compile one candidate without running it and load it (which raises if it does not
    fit the GPU); what the compiler reports.  Runs in a worker thread."""
    with torch.cuda.device(request.device):
        kernel = request.kernel.warmup(*request.args, grid=request.grid, **request.constants, **config)
        kernel.run  # noqa: B018 (loading the binary is what reports registers and spills)
    return Compiled(kernel.n_regs, kernel.n_spills, kernel.metadata.shared)


def _tuned(request: Request, hooks: _Hooks) -> dict:
    """The tuner's configuration for the request (on its key's first call: tuned), kept
    in the plan's ``tuned`` too where the tuner keeps it."""
    info = device_info(request.device, hooks)
    key = request.key if hooks.only is None else (*request.key, *hooks.only)
    family = tuner(request.family, request.kernel)
    config = family.chosen(info.name, key)  # (a tuned key: one lookup, nothing built for a first call)
    if config is None:
        if hooks.compile is not None:
            compile = functools.partial(hooks.compile, request)
        elif request.device.type == "cuda" and hooks.launch is None:
            compile = functools.partial(_compile, request)
        else:
            compile = None
        config = family.pick(
            info.name, key, lambda: candidates(request, info),
            lambda config: _run(request, config, hooks.launch), tune=hooks.tune, compile=compile, clock=hooks.clock,
            variants=request.variants)
    if family.chosen(info.name, key) is not None:
        _keep(request.tuned, hooks, request.device, config)
    return config


def launch(request: Request) -> PreparedLaunch | None:
    """Choose the request's configuration (on a key's first call: tune it), launch it,
    and report the launch to the observers.  Returns the class's prepared launch for its
    later calls (in this epoch: a hook's choice holds within its ``intercept``), or None
    where none may be kept: a hook replaces the launch, a compile or the clock, or the
    tuner did not keep its choice (an untimed pick during CUDA-graph capture)."""
    hooks = _hooks()
    if hooks.choose is not None:
        config = hooks.choose(request, candidates(request, device_info(request.device, hooks)))
    else:
        config = _kept(request.tuned, hooks, request.device) or _tuned(request, hooks)
    compiled = None if _STUBBED else (hooks.launch or run_kernel)(request, config)
    notify_launch(request.family, request.constants, request.args[0].dtype, config)
    if (hooks.launch or hooks.compile or hooks.clock
            or (hooks.choose is None and _kept(request.tuned, hooks, request.device) is None)):
        return None
    return PreparedLaunch(request, config, compiled)


def race(device: torch.device, key: tuple, runs: dict[str, Callable[[], torch.Tensor]],
         family: str = "backend", decided: dict | None = None) -> str:
    """The name of the fastest of ``runs`` (each computes the same result) for ``key``,
    timed on the key's first call, remembered as a tuning is (as ``family`` in the cache:
    a race run inside another's runs needs a family of its own, since a family tunes one
    key at a time); the first run is the default and the reference the winner is checked
    against.  Each run is called once before it is timed (so that its own first-call
    tuning is not what gets timed); without tuning, only the default runs.  Hooks
    ``tune`` and ``clock`` apply, and ``only``: a run's name counts as a constant that
    its candidate sets (``(("staged", True),)`` keeps only the run ``"staged"``,
    ``False`` every other).  ``decided``: a dict the caller keeps for this one key (a
    launch plan's ``raced``), where the answer is kept too, so that a repeated call
    costs a lookup of the device and hooks instead of hashing the whole key."""
    hooks = _hooks()
    kept = _kept(decided, hooks, device)
    if kept is not None:
        return kept
    only = hooks.only
    if only is not None:
        names = [name for name in runs if all((name == constant) == on for constant, on in only if constant in runs)]
        runs = {name: runs[name] for name in names} or runs
        key = (*key, *only)
    info = device_info(device, hooks)
    chooser = tuner(family)
    config = chooser.chosen(info.name, key)
    if config is None:
        warm: set = set()

        def run(config: dict) -> torch.Tensor:
            name = config["backend"]
            if name not in warm:
                warm.add(name)
                runs[name]()
            return runs[name]()

        config = chooser.pick(info.name, key, lambda: [{"backend": name} for name in runs], run, tune=hooks.tune,
                              clock=hooks.clock)
    if chooser.chosen(info.name, key) is not None:
        _keep(decided, hooks, device, config["backend"])
    return config["backend"]
