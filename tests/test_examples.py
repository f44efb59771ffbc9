"""The worked example in docs/examples runs as the README says, at toy size in the
interpreter: two unchanged decoders converted, checked, trained and compiled."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "decoders.py"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the toy run needs the interpreter on a CPU")
def test_decoders_example_runs_at_toy_size():
    run = subprocess.run([sys.executable, str(EXAMPLE), "--toy"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for name in ("DCGAN generator", "U-Net decoder"):
        lines = [line for line in run.stdout.splitlines() if line.startswith(name)]
        assert len(lines) == 3, run.stdout
        launches = int(lines[0].split(": ")[1].split()[0])
        assert launches > 0  # the converted model ran our kernels
        assert "same losses as the original" in lines[1] and "agrees" in lines[2]
