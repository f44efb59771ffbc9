"""The README's demo command runs and checks itself against PyTorch."""
import re
import subprocess
import sys


def test_demo_runs():
    proc = subprocess.run([sys.executable, "-m", "tritondeconv.demo"], capture_output=True, text=True, check=True)
    err = float(re.search(r"relative error against PyTorch in float64: (\S+)", proc.stdout).group(1))
    assert err < 1e-3
    assert "4.00x fewer" in proc.stdout
