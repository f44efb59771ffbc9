"""The README's demo command runs, checks itself against PyTorch, and says what ran: the
Triton kernel (where, and how many launches it observed) or aten's fallback, never a
path it did not take."""
import os
import re
import subprocess
import sys

import pytest
import torch

import tritondeconv
import tritondeconv.demo
from tritondeconv.kernels import launcher
from tritondeconv.kernels.tuning import NoConfigurationRan

HAS_CUDA = torch.cuda.is_available()
RAN_KERNEL = re.compile(r"^ran: Triton kernel phase_gemm \((\d+) launch(?:es)?\) (.+)$", re.MULTILINE)
RERUN_NOTICE = "running the demo again in a fresh process with TRITON_INTERPRET=1"


def run_demo(**env_overrides: str | None) -> subprocess.CompletedProcess:
    """``python -m tritondeconv.demo`` in a fresh process, its environment without
    ``TRITON_INTERPRET`` or the demo's rerun marker except as ``env_overrides`` set them."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", tritondeconv.demo.RERUN_MARKER)}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    return subprocess.run([sys.executable, "-m", "tritondeconv.demo"], capture_output=True, text=True, env=env)


def check_layer(stdout: str) -> None:
    """The demo's account of the layer: its error against float64 and its multiply-adds."""
    err = float(re.search(r"relative error against PyTorch in float64: (\S+)", stdout).group(1))
    assert err < 1e-3
    assert "4.00x fewer" in stdout


@pytest.mark.parametrize("interpret", [None, "1"], ids=["TRITON_INTERPRET-unset", "TRITON_INTERPRET=1"])
def test_demo_runs_the_kernel_and_says_where(interpret):
    """Without a GPU the kernel runs in the Triton interpreter whether or not the variable
    was set (unset, the demo reruns itself with it); the demo reports the launches it saw."""
    proc = run_demo(TRITON_INTERPRET=interpret)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_layer(proc.stdout)
    ran = RAN_KERNEL.search(proc.stdout)
    assert ran, proc.stdout
    assert int(ran.group(1)) > 0
    compiled = HAS_CUDA and interpret is None
    assert ran.group(2) == ("compiled for " + torch.cuda.get_device_name() if compiled else "in the Triton interpreter")
    assert "aten fallback" not in proc.stdout
    assert (RERUN_NOTICE in proc.stdout) == (not HAS_CUDA and interpret is None)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel runs compiled, whatever TRITON_INTERPRET says to the CPU")
def test_demo_with_the_interpreter_turned_off_reports_the_fallback():
    """An explicit TRITON_INTERPRET=0 is kept: on CPU, aten computes the layer, and the
    demo says so instead of claiming the kernel."""
    proc = run_demo(TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_layer(proc.stdout)
    assert "ran: aten fallback (no Triton kernel launched)" in proc.stdout
    assert not RAN_KERNEL.search(proc.stdout)
    assert RERUN_NOTICE not in proc.stdout


@pytest.mark.skipif(HAS_CUDA, reason="the demo reruns itself only without a GPU")
def test_demo_reruns_itself_at_most_once():
    """A process started by the demo's rerun never starts another: if its kernels were
    still defined for the compiler, it reports aten's fallback rather than looping."""
    proc = run_demo(**{tritondeconv.demo.RERUN_MARKER: "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert RERUN_NOTICE not in proc.stdout
    assert "ran: aten fallback (no Triton kernel launched)" in proc.stdout


@pytest.mark.skipif(not tritondeconv.backends.runs_triton(torch.device("cuda" if HAS_CUDA else "cpu")),
                    reason="the kernels run neither on a GPU nor in the interpreter here")
def test_demo_does_not_claim_a_kernel_that_did_not_launch(capsys):
    """Where the kernel should run but the op launched none (here: no configuration
    could run, through the launcher's seam, so aten computed the result), the demo says
    the result came from aten and fails, rather than describing a kernel run."""
    def no_configuration_runs(request, candidates):
        raise NoConfigurationRan("test: no configuration can run")

    with launcher.intercept(choose=no_configuration_runs), pytest.warns(UserWarning, match="computed by aten"):
        assert tritondeconv.demo.main() == 1
    out = capsys.readouterr().out
    assert "ran: aten fallback: no Triton kernel launched" in out
    assert not RAN_KERNEL.search(out)


@pytest.mark.skipif(not tritondeconv.backends.runs_triton(torch.device("cuda" if HAS_CUDA else "cpu")),
                    reason="the kernels run neither on a GPU nor in the interpreter here")
def test_demo_fails_when_its_result_is_wrong(capsys):
    """A kernel that writes a wrong result (here: every launch's output zeroed after the
    real kernel ran, through the launcher's seam) makes the demo say so and exit 1."""
    def wrong(request, config):
        launcher.run_kernel(request, config)
        request.output.zero_()

    with launcher.intercept(launch=wrong):
        assert tritondeconv.demo.main() == 1
    out = capsys.readouterr().out
    assert "relative error against PyTorch in float64: 1.00e+00" in out and "check: FAILED" in out
