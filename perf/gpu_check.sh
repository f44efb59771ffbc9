#!/usr/bin/env bash
# One command for the lent GPU: install offline, run the cuda tests, the demo and the
# benchmark (with its plots), and leave their output in the folder given as the first
# argument.  BENCH_ARGS passes options to perf/bench.py (e.g. "--passes fwd").
#   bash perf/gpu_check.sh "$OUT"
set -uo pipefail
out="${1:?usage: perf/gpu_check.sh OUTPUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', torch.backends.cudnn.version())"
} | tee "$out/versions.txt"
# The test grid itself runs with one fixed config (tuning every small test shape would
# take longer than the tests); the demo below tunes its layer.
TRITONDECONV_AUTOTUNE=0 python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.txt"
status=${PIPESTATUS[0]}
python -m tritondeconv.demo 2>&1 | tee "$out/demo.txt"
python perf/bench.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
python perf/plot.py "$out/bench.csv"
python perf/bench_blocks.py --out "$out" 2>&1 | tee "$out/blocks.log"
exit "$status"
