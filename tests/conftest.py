import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from reference import GEMMS, RUN_SALT, tile_sides

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.kernels.common import observe_launches, poison_allocations

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _device_params():
    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETING, reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
        ),
    )
    cuda = pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"),
            pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET=1 would run the GPU tests in the interpreter"),
        ],
    )
    return [cpu, cuda]


# The interpreter runs a subset of the GPU's cases (it is slow), and a few cases belong
# to one device: markers say which, and the other cases skip with the marker's reason.
MARKERS = [
    ("interpreter_subset(*cases, reason): of the CPU cases (run in the interpreter), only those whose "
     "parameters match one of `cases` (dicts of parameter -> value) run; every CUDA case runs"),
    "only_on(device, reason): only the case on `device` (the `device` fixture's parameter) runs",
]


def _not_run_here(item) -> str | None:
    """Why the case ``item`` skips on its device, by its ``only_on`` and
    ``interpreter_subset`` markers; None when it runs."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    only_on = item.get_closest_marker("only_on")
    if only_on is not None and params.get("device") != only_on.args[0]:
        return only_on.kwargs["reason"]
    subset = item.get_closest_marker("interpreter_subset")
    if subset is not None and params.get("device") == "cpu" and not any(
            all(params[name] == value for name, value in case.items()) for case in subset.args):
        return subset.kwargs["reason"]
    return None


def pytest_report_header(config):
    return f"tritondeconv test seed salt: {RUN_SALT} (rerun a failure with TRITONDECONV_TEST_SEED={RUN_SALT})"


@pytest.fixture(params=_device_params())
def device(request):
    """Every device on which the Triton kernels (not a fallback) run.

    A test that takes this fixture claims the Triton path: its kernel launches are
    recorded (through ``observe_launches``) into the run's coverage table, and a test
    that passes without launching any kernel fails, unless it is marked
    ``no_kernel`` with the reason (an empty batch, an argument error, a fake tensor)."""
    with observe_launches() as launches:
        yield request.param
    gemms = [launch for launch in launches if launch.kernel in GEMMS]
    for launch in gemms:
        COVERAGE.add(_cell(launch))
    if gemms:
        PATHS_BY_TEST.setdefault(_function_id(request.node), set()).update(_cell(launch)[0] for launch in gemms)
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed and request.node.get_closest_marker("no_kernel") is None:
        require_launches(launches)


def require_launches(launches: list) -> None:
    """Fail unless some kernel launched (the check the ``device`` fixture makes)."""
    if not launches:
        pytest.fail("the test takes the `device` fixture (the Triton path) but launched no kernel: "
                    "mark it no_kernel(reason) if that is what it tests", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each test's call report on its item (the ``device`` fixture reads it)."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call":
        item.report_call = report
    if report.failed and os.environ.get("TRITONDECONV_FAILURE_LOG"):
        _log_failure(os.environ["TRITONDECONV_FAILURE_LOG"], item.nodeid, call.when, report)


def _log_failure(path: str, nodeid: str, when: str, report) -> None:
    """Append a failure to ``TRITONDECONV_FAILURE_LOG`` as it happens (each process of an
    xdist run appends its own): the test, the phase, and the error's last lines, so that
    a run stopped before its summary still says what failed and why."""
    lines = str(report.longrepr).strip().splitlines()[-6:]
    with open(path, "a") as log:
        log.write(f"FAILED {nodeid} ({when})\n" + "".join(f"    {line[:300]}\n" for line in lines))


# ---------------------------------------------------------------- the coverage table
# Every kernel path the GPU runs, as the CPU suite must reach it in the interpreter:
# path × dtype × direction (forward with and without an epilogue, the forward's one-GEMM
# variant, input gradient, weight gradient with one tap or several per column tile) ×
# index width.  The interpreter's tl.dot is a NumPy matmul: reaching a cell proves
# indexing, masking and the epilogue, not MMA numerics or pipelining.

PATHS = ("tensor-core", "fma")
DTYPES_COVERED = ("float64", "float32", "float16", "bfloat16")
DIRECTIONS = ("forward", "forward+epilogue", "forward-one-gemm", "forward-phase-columns", "input-grad", "weight-grad",
              "weight-grad-taps")
INDEX = ("int32", "int64")
# The grouped kernel (few channels per group, the groups side by side) computes the
# forward and the input gradient, on a path of its own.
GROUPED_DIRECTIONS = ("forward", "forward+epilogue", "input-grad")
COVERAGE: set = set()

# And every test function that launches kernels reaches the tensor-core path in at least
# one of its cases (a geometry with >= 16 channels on each side), unless it is marked
# ``fma_only(reason)``: the GPU runs ordinary layers on tensor cores, so a test family that
# only ever ran FMA tiles would leave the GPU's path of that family untested.
PATHS_BY_TEST: dict[str, set] = {}


def _function_id(item) -> str:
    """The test function's id, without the parametrization (all its cases together)."""
    return item.nodeid.split("[", 1)[0]


def _cell(launch) -> tuple:
    path = "tensor-core" if min(tile_sides(launch.kernel, launch.constants)) >= 16 else "fma"
    c = launch.constants
    if launch.kernel == "grouped":
        path = "grouped"
    if launch.kernel == "weight_grad":
        direction = "weight-grad-taps" if c["TAPS_N"] > 1 else "weight-grad"
    elif not c["TRANSPOSED"]:
        direction = "input-grad"
    elif c.get("ONE_GEMM"):
        direction = "forward-one-gemm"
    elif c.get("PHASE_COLUMNS"):
        direction = "forward-phase-columns"
    else:
        direction = "forward+epilogue" if c["ACTIVATION"] or c["HAS_RESIDUAL"] else "forward"
    return path, str(launch.dtype).removeprefix("torch."), direction, "int64" if c["INT64_INDEX"] else "int32"


def _whole_suite(session) -> bool:
    """Whether this run is the whole CPU suite (nothing selected away), the only run
    whose coverage must be complete."""
    option = session.config.option
    return (INTERPRETING and not option.keyword and not option.markexpr and not option.deselect
            and session.config.args in ([], [str(session.config.rootpath / "tests")], ["tests"]))


CELLS = [*itertools.product(PATHS, DTYPES_COVERED, DIRECTIONS, INDEX),
         *itertools.product(("grouped",), DTYPES_COVERED, GROUPED_DIRECTIONS, INDEX)]


def _missing() -> list[tuple]:
    return [cell for cell in CELLS if cell not in COVERAGE]


_FMA_ONLY: set = set()  # the function ids marked fma_only


def pytest_collection_modifyitems(session, config, items):
    _FMA_ONLY.update(_function_id(item) for item in items if item.get_closest_marker("fma_only"))
    for item in items:
        reason = _not_run_here(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _fma_only_tests() -> list[str]:
    """The kernel-launching test functions that never reached the tensor-core path and do
    not say why."""
    return sorted(test for test, paths in PATHS_BY_TEST.items()
                  if "tensor-core" not in paths and test not in _FMA_ONLY)


# Under pytest-xdist each worker reaches part of the table: workers write theirs to a
# folder the controller made (inherited through the environment), and the controller
# merges them before it checks.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_COVERAGE_DIR = "TRITONDECONV_COVERAGE_DIR"


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    if _WORKER is None and not os.environ.get(_COVERAGE_DIR):
        os.environ[_COVERAGE_DIR] = tempfile.mkdtemp(prefix="tritondeconv-coverage-")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if INTERPRETING and COVERAGE:
        total = len(CELLS)
        terminalreporter.write_line(f"kernel coverage: {total - len(_missing())} of {total} cells "
                                    "(path x dtype x direction x index width) reached")
        for cell in _missing():
            terminalreporter.write_line(f"  not reached: {' '.join(cell)}")
        for test in _fma_only_tests():
            terminalreporter.write_line(f"  only FMA tiles (no case with >= 16 channels, not marked fma_only): {test}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    folder = Path(os.environ.get(_COVERAGE_DIR, ""))
    if _WORKER is not None:
        (folder / f"{_WORKER}.json").write_text(json.dumps(
            {"cells": sorted(COVERAGE), "paths": {test: sorted(paths) for test, paths in PATHS_BY_TEST.items()},
             "fma_only": sorted(_FMA_ONLY)}))
        return
    for part in folder.glob("*.json") if folder.name else ():
        worker = json.loads(part.read_text())
        COVERAGE.update(tuple(cell) for cell in worker["cells"])
        for test, paths in worker["paths"].items():
            PATHS_BY_TEST.setdefault(test, set()).update(paths)
        _FMA_ONLY.update(worker["fma_only"])
    if folder.name:
        shutil.rmtree(folder, ignore_errors=True)
    if _whole_suite(session) and (_missing() or _fma_only_tests()) and exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty tuning cache folder for the test."""
    monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def first_calls(cache_dir):
    """Every key's next call is a first call (and the backend is restored)."""
    launcher.forget_tunings()
    yield
    launcher.forget_tunings()
    tritondeconv.set_backend("triton")


@pytest.fixture
def poisoned_outputs():
    """Make every tensor the ops allocate for a result (outputs, gradients, the weight
    gradient's workspace) start as NaN, so an unwritten element fails."""
    with poison_allocations(float("nan")):
        yield


@pytest.fixture
def precision(request):
    """Set PyTorch's TF32 switch for the precision under test (restored afterwards)."""
    name = request.param
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = name == "tf32"
    yield name
    torch.backends.cudnn.allow_tf32 = before
