#!/usr/bin/env bash
# One command for the lent GPU: install offline, then run the stages named after the
# output folder (default: all of them, in this order) and leave their output there.
#   bash perf/gpu_check.sh "$OUT"                    # everything (about 20 minutes)
#   bash perf/gpu_check.sh "$OUT" tests bench-2d-fwd # split over device calls of 10 minutes
# Stages:
#   tests         the cuda tests (one fixed config: tuning every small test shape would
#                 take longer than the tests), and the demo (which tunes its layer)
#   bench-2d-fwd  perf/bench.py's 2-D suite, forward
#   bench-2d-bwd  the same, forward+backward
#   bench-1d3d    the 1-D and 3-D suites, both passes
#   blocks        perf/bench_blocks.py (folded upsample+conv, fused epilogues)
#   sanitize      the cuda forward and backward tests under compute-sanitizer's memcheck
#                 (not in the default list: slow; needs a runtime where the sanitizer
#                 works, see the device tool's KINDS.md)
# The bench stages add their rows to OUTPUT_DIR/bench.csv (and redraw the plots); the
# CSVs of stages run in separate device calls merge with
#   python perf/bench.py --merge A/bench.csv B/bench.csv --out perf/results/<gpu>
# BENCH_ARGS passes options to perf/bench.py (e.g. "--passes fwd").
set -uo pipefail
out="${1:?usage: perf/gpu_check.sh OUTPUT_DIR [STAGE ...]}"
shift
[ $# -gt 0 ] || set -- tests bench-2d-fwd bench-2d-bwd bench-1d3d blocks
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', torch.backends.cudnn.version())"
} | tee "$out/versions.txt"
status=0
for stage in "$@"; do
  echo "=== $stage"
  case "$stage" in
    tests)
      TRITONDECONV_AUTOTUNE=0 python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      python -m tritondeconv.demo 2>&1 | tee "$out/demo.txt" ;;
    bench-2d-fwd|bench-2d-bwd|bench-1d3d)
      case "$stage" in
        bench-2d-fwd) args=(--suites 2d --passes fwd) ;;
        bench-2d-bwd) args=(--suites 2d --passes fwd+bwd) ;;
        bench-1d3d) args=(--suites 1d,3d) ;;
      esac
      python perf/bench.py "${args[@]}" --append --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/$stage.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      python perf/plot.py "$out/bench.csv" ;;
    blocks)
      python perf/bench_blocks.py --out "$out" 2>&1 | tee "$out/blocks.log" ;;
    sanitize)
      # Without the caching allocator, so that an access past a tensor is past an allocation.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITONDECONV_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python -m pytest -q -m cuda -p no:cacheprovider tests/test_forward.py tests/test_backward.py \
        -k "float16 or float64" 2>&1 | tee "$out/sanitizer.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit "$status"
