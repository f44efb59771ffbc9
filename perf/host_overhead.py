"""Host time per call: our Python on the way to a kernel launch, beside aten's whole call
on the same tensors.

    python perf/host_overhead.py [--repeat 2000] [--device cpu|cuda] [--trace N] [--profile N]

The Triton launch is stubbed through the launcher's seam (``kernels.launcher.
stub_launches``): a call does everything it does on a GPU but call the compiled kernel's
launcher, so what is timed is everything before it: argument checks, the PyTorch
dispatcher, the prepared call's lookup, weight packing, allocation, the lean launch's
own work.  The tensors are
small (1×8×4×4, 8 → 8 channels, k4 s2 p1; one case with 16 channels, where the launch
looks up its race against a channels-last copy of the input), so aten's own call is
mostly host time too.
Reports medians of ``--repeat`` calls, ours and aten's in alternating blocks, one thread:

* Python-level calls (``sys.setprofile``'s function and builtin calls) of a module's
  forward without grad and of a training step, ours beside torch.nn's (``--counts``:
  only these, no timing);
* the functional API and a module, forward (no grad; a module's also under
  ``torch.inference_mode``) and forward+backward, each beside aten's, and their ratio
  (the target: at most aten's); forward+backward again with the backward on the calling
  thread (``torch.autograd.set_multithreading_enabled(False)``): on a GPU the engine
  otherwise runs it on its device thread, and the difference is that hop's cost;
* the forward's parts: our implementation (the prepared call's lookup, packing,
  allocation, the lean launch's own work), the public function's own layer (argument
  parsing, the plain-call test), the trip through PyTorch's dispatcher that a call
  through ``torch.ops`` pays, and on a GPU the launch itself (the compiled kernel's C
  launcher and the driver: the implementation launching against it stubbed) and the
  implementation with its launch through Triton's JIT instead, as a first call goes;
* Triton's JIT per launch on this host, answering as an H100 (sm_90), measurable without
  a GPU: binding and specialising the forward kernel's arguments and building its cache
  key, what every launch through the JIT pays before the driver call (the lean launch
  skips it);
* the parts of our module's forward+backward: the forward that records the graph, the
  two gradients' implementations alone, and the rest (PyTorch's engine and our
  backward's own Python among it);
* where a training step's backward goes: the route our recorded backward takes (the
  prepared gradients, or through the ops) and the step's µs, with the engine's own
  threading (on a GPU, its device thread) and inline; and the ``--trace N`` events with
  the most own CPU time per step in ``torch.profiler``'s trace, each with its thread (the
  profiler records the device thread, which ``sys.setprofile`` and cProfile miss);
* with ``--profile N``: where our module's forward+backward spends its time, the N
  functions with the most time of their own (``cProfile``, the launches replaced).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import platform
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import tritondeconv
from tritondeconv.dispatch import IMPLEMENTATIONS
from tritondeconv.gradients import ROUTES
from tritondeconv.kernels import launcher
from tritondeconv.weights import PACKED


def _median_us(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def _compare_us(ours, aten, repeat: int, rounds: int = 10) -> tuple[float, float]:
    """(ours, aten's) µs: the medians over ``rounds`` alternating blocks of ``repeat /
    rounds`` calls each, so that a drift of the machine's speed hits both alike."""
    ours_us, aten_us = [], []
    for _ in range(rounds):
        with launcher.stub_launches():
            ours_us.append(_median_us(ours, max(1, repeat // rounds)))
        aten_us.append(_median_us(aten, max(1, repeat // rounds)))
    return statistics.median(ours_us), statistics.median(aten_us)


def _tensors(device: str):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, device=device)
    w = torch.randn(8, 8, 4, 4, device=device)
    b = torch.randn(8, device=device)
    return x, w, b


def measure(repeat: int, device: str = "cpu") -> list[tuple[str, float, float]]:
    """(case, our µs, aten's µs) per case, the launches replaced by a no-op."""
    x, w, b = _tensors(device)
    ours_module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    aten_module = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()

    def backward(fn):
        def run():
            fn(xg).sum().backward()
        return run

    def inline(fn):  # the backward on this thread, not the engine's device thread (a GPU's)
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn(xg).sum().backward()
        return run

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn(x)
        return run

    # 16 channels of NCHW input: the phase GEMM's launcher looks up its race against a
    # channels-last copy of the input (8 channels take no race).
    x16, w16, b16 = torch.randn(1, 16, 4, 4, device=device), torch.randn(16, 16, 4, 4, device=device), b.repeat(2)
    cases = {
        "functional forward": (lambda: tritondeconv.conv_transpose2d(x, w, b, 2, 1),
                               lambda: F.conv_transpose2d(x, w, b, 2, 1)),
        "functional forward, 16 channels (the input-copy race)": (
            lambda: tritondeconv.conv_transpose2d(x16, w16, b16, 2, 1),
            lambda: F.conv_transpose2d(x16, w16, b16, 2, 1)),
        "module forward": (lambda: ours_module(x), lambda: aten_module(x)),
        "module forward under inference_mode": (inference(ours_module), inference(aten_module)),
        "module forward+backward": (backward(ours_module), backward(aten_module)),
        "module forward+backward, the backward inline": (inline(ours_module), inline(aten_module)),
    }
    rows = []
    for name, (ours, aten) in cases.items():
        with torch.set_grad_enabled("backward" in name):
            rows.append((name, *_compare_us(ours, aten, repeat)))
    return rows


def python_calls(fn) -> int:
    """The Python-level calls one call of ``fn`` makes: function and builtin calls, as
    ``sys.setprofile`` reports them (its ``call`` and ``c_call`` events), in this thread;
    noise-free, unlike a time.  ``fn`` runs twice first, so that nothing of a first call
    is counted."""
    fn()
    fn()
    count = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(profile)
    fn()
    sys.setprofile(None)
    return count[0] - 1  # (the call of sys.setprofile that ends the count)


def call_counts(device: str = "cpu") -> list[tuple[str, int, int]]:
    """(case, our calls, torch.nn's calls): a module's forward without grad, and a
    training step (forward, the loss's sum, backward), the launches replaced by a no-op.
    A CPU backward runs in the calling thread, so its calls are counted too (a CUDA
    backward runs on the autograd engine's device thread, which ``sys.setprofile`` does
    not see: count on the CPU)."""
    x, _, _ = _tensors(device)
    ours = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    aten = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()
    rows = []
    for name, run in (("module forward (no grad)", lambda m: m(x)),
                      ("training step (module forward, sum, backward)", lambda m: m(xg).sum().backward())):
        with torch.set_grad_enabled(name.startswith("training")):
            with launcher.stub_launches():
                counted = python_calls(lambda run=run: run(ours))
            rows.append((name, counted, python_calls(lambda run=run: run(aten))))
    return rows


def parts(repeat: int, device: str = "cpu") -> list[tuple[str, float]]:
    """(part, µs) of one forward call without grad: each layer's own time; on a GPU also
    the launch itself (the compiled kernel's C launcher and the driver), and the same
    launch through Triton's JIT (``PreparedLaunch.jit``, the way a call at another
    alignment goes)."""
    x, w, b = _tensors(device)
    geometry = ([2, 2], [1, 1], [0, 0], 1, [1, 1])
    op = torch.ops.tritondeconv.conv_transpose.default
    implementation = IMPLEMENTATIONS[op]
    calls = {"public": lambda: tritondeconv.conv_transpose2d(x, w, b, 2, 1),
             "dispatched": lambda: op(x, w, b, *geometry),
             "direct": lambda: implementation(x, w, b, *geometry)}
    times = {name: [] for name in (*calls, "launched", "through the JIT")}
    rounds = 10
    with torch.no_grad():
        for _ in range(rounds):  # alternating, so that a drift of the machine's speed hits every part alike
            with launcher.stub_launches():
                for name, call in calls.items():
                    times[name].append(_median_us(call, max(1, repeat // rounds)))
            if device == "cuda":
                times["launched"].append(_median_us(calls["direct"], max(1, repeat // rounds)))
                with launcher.intercept(launch=launcher.run_kernel):  # (each launch through the JIT)
                    times["through the JIT"].append(_median_us(calls["direct"], max(1, repeat // rounds)))
    us = {name: statistics.median(t) for name, t in times.items() if t}
    rows = [("our implementation, called directly (the prepared call's lookup, packing, allocation, the lean "
             "launch's own work)", us["direct"]),
            ("the public function's own layer (parsing, the plain-call test)", us["public"] - us["direct"]),
            ("the trip through PyTorch's dispatcher, for calls through torch.ops", us["dispatched"] - us["direct"])]
    if device == "cuda":
        rows.append(("the launch itself: the compiled kernel's C launcher, the driver", us["launched"] - us["direct"]))
        rows.append(("the implementation with each launch through Triton's JIT instead (a first call's way)",
                     us["through the JIT"]))
    return rows


def jit_binding(repeat: int) -> tuple[int, float]:
    """(arguments, µs): the forward's phase-GEMM launch as Triton's JIT prepares it on
    every call before looking up its compiled kernel (``binder``: binding and
    specialising each argument; ``compute_cache_key``), for an sm_90 target, timed on
    this host with the launch's real arguments (taken through the launcher's seam)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    x, w, b = _tensors("cpu")
    seen = []
    with launcher.intercept(launch=lambda request, config: seen.append((request, config)), tune=False):
        tritondeconv.conv_transpose2d(x, w, b, 2, 1)
    request, config = seen[0]
    # (Under TRITON_INTERPRET=1 the kernel is the interpreter's wrapper: the JIT's own view of its function.)
    kernel = request.kernel if hasattr(request.kernel, "signature") else JITFunction(request.kernel.fn)
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    arguments, options, keys = request.args, {**request.constants, **config, "debug": False}, {}

    def prepare():
        _, specialisation, compile_options = binder(*arguments, **options)
        compute_cache_key(keys, specialisation, compile_options)

    return len(arguments), statistics.median(_median_us(prepare, max(1, repeat // 10)) for _ in range(10))


def training_parts(repeat: int, device: str = "cpu") -> list[tuple[str, float]]:
    """(part, µs) of one forward+backward step of our module: the forward that records
    the graph, each gradient's implementation called alone, and the rest (the loss's
    sum and its gradient, our backward's own Python, PyTorch's engine running it,
    accumulating the gradients)."""
    x, _, _ = _tensors(device)
    module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()
    grad_y = torch.randn_like(module(x))
    ops = torch.ops.tritondeconv
    input_grad = IMPLEMENTATIONS[ops.conv_transpose_input_grad.default]
    weight_grad = IMPLEMENTATIONS[ops.conv_transpose_weight_grad.default]
    geometry = ([2, 2], [1, 1], [1, 1], 1)
    calls = {"step": lambda: module(xg).sum().backward(),
             "forward": lambda: module(xg),
             "input gradient": lambda: input_grad(grad_y, module.weight, [4, 4], *geometry),
             "weight gradient": lambda: weight_grad(x, grad_y, [4, 4], *geometry)}
    times = {name: [] for name in calls}
    rounds = 10
    for _ in range(rounds):
        with launcher.stub_launches():
            for name, call in calls.items():
                recorded = name in ("step", "forward")
                # A gradient alone as the backward runs it: no graph, and the weight being
                # trained packed afresh (no copy of it is kept).
                with torch.set_grad_enabled(recorded), contextlib.nullcontext() if recorded else PACKED.trained():
                    times[name].append(_median_us(call, max(1, repeat // rounds)))
    us = {name: statistics.median(t) for name, t in times.items()}
    return [("the forward, recording the graph (our Function's apply and context, the weight packed)", us["forward"]),
            ("the input gradient's implementation (checks, plan, the weight packed, allocation)", us["input gradient"]),
            ("the weight gradient's implementation (plan, allocation)", us["weight gradient"]),
            ("the rest: the loss's sum and its gradient, our backward's Python, PyTorch's engine, the gradients "
             "accumulated", us["step"] - us["forward"] - us["input gradient"] - us["weight gradient"])]


def backward_threads(repeat: int, device: str, top: int) -> list[str]:
    """Where a training step's backward goes (the launches replaced by a no-op): for the
    engine's own way (on a GPU its device thread) and inline, the route our recorded
    backward took (``gradients.ROUTES``: the prepared gradients, or through the ops) and
    the step's µs; then, for the engine's way, the ``top`` events by own CPU time in
    ``torch.profiler``'s trace, which records every thread (the device thread too, where
    ``sys.setprofile`` and cProfile do not), each with the thread it ran on."""
    x, _, _ = _tensors(device)
    module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()

    def step():
        module(xg).sum().backward()

    lines = ["| backward | route of our backward (prepared / through the ops) | step µs |", "| --- | --- | --- |"]
    with launcher.stub_launches():
        for name, multithreaded in (("the engine's way (a GPU: its device thread)", True), ("inline", False)):
            with torch.autograd.set_multithreading_enabled(multithreaded):
                before = dict(ROUTES)
                us = _median_us(step, repeat)
                routes = {route: ROUTES[route] - before.get(route, 0) for route in ("prepared", "ops")}
            lines.append(f"| {name} | {routes['prepared']} / {routes['ops']} | {us:.1f} |")
        steps = max(1, repeat // 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as trace:
            for _ in range(steps):
                step()
    own: dict[tuple[int, str], float] = {}
    for event in trace.events():
        if not event.name.startswith("torch/autograd/profiler.py"):  # (the trace's own start)
            own[(event.thread, event.name)] = own.get((event.thread, event.name), 0.0) + event.self_cpu_time_total
    lines += ["", "| own CPU time per step, the engine's way (torch.profiler) | profiler's thread | µs |",
              "| --- | --- | --- |"]
    for (thread, name), total in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| {name[:100]} | {thread} | {total / steps:.1f} |")
    return lines


def profile(repeat: int, device: str, top: int) -> str:
    """The ``top`` functions by own time in ``repeat`` forward+backward calls of our
    module, the launches replaced by a no-op (``cProfile``'s table)."""
    x, _, _ = _tensors(device)
    module = tritondeconv.nn.ConvTranspose2d(8, 8, 4, 2, 1).to(device)
    xg = x.clone().requires_grad_()
    with launcher.stub_launches():
        for _ in range(20):
            module(xg).sum().backward()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeat):
            module(xg).sum().backward()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _cpu_model() -> str:
    """The host CPU's model name, as the kernel reports it (the architecture's name where
    it reports none)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--counts", action="store_true", help="only the Python-level call counts (no timing)")
    ap.add_argument("--trace", type=int, default=15, metavar="N",
                    help="the N events with the most own CPU time in a training step, per thread (torch.profiler)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N functions with the most own time in our module's forward+backward")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("host_overhead: --device cuda needs a CUDA GPU; this machine has none (use --device cpu)")
        return 2
    torch.set_num_threads(1)  # tiny tensors: one thread, and no spinning workers to skew the clock
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({_cpu_model()}, one thread)"
    print(f"torch {torch.__version__}, triton {triton.__version__}; {where}; {a.repeat} calls per case; "
          "the launch itself replaced by a no-op")
    print("| Python-level calls (sys.setprofile) | ours | torch.nn's |")
    print("| --- | --- | --- |")
    for name, ours, aten in call_counts(a.device):
        print(f"| {name} | {ours} | {aten} |")
    if a.counts:
        return 0
    print()
    print("| call | ours µs | aten µs | ours / aten |")
    print("| --- | --- | --- | --- |")
    for name, ours, aten in measure(a.repeat, a.device):
        print(f"| {name} | {ours:.1f} | {aten:.1f} | {ours / aten:.2f} |")
    print()
    print("| part of a forward call | µs |")
    print("| --- | --- |")
    for name, us in parts(a.repeat, a.device):
        print(f"| {name} | {us:.1f} |")
    count, us = jit_binding(a.repeat)
    print(f"| Triton's JIT per launch, before the driver call: binding and specialising the forward kernel's {count} "
          f"arguments, its cache key (as an H100, sm_90) | {us:.1f} |")
    print()
    print("| part of a module's forward+backward | µs |")
    print("| --- | --- |")
    for name, us in training_parts(a.repeat, a.device):
        print(f"| {name} | {us:.1f} |")
    print()
    for line in backward_threads(a.repeat, a.device, a.trace):
        print(line)
    if a.profile:
        print()
        print(profile(a.repeat, a.device, a.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
