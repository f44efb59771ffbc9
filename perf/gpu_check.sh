#!/usr/bin/env bash
# The GPU run, in stages ordered by what they decide, each fitting one device command:
#   bash perf/gpu_check.sh OUT_DIR [STAGE ...]     # the stages named (default: all, in order)
#   bash perf/gpu_check.sh OUT_DIR --list          # the stages and what each measures
# Each stage stops itself at its budget (STAGE_BUDGET seconds, default 480) with what it
# measured so far written. A bench stage first compiles every kernel its first calls will
# time on all cores (perf/candidates.py --warm), so tuning finds them in Triton's cache. Everything a call produced (logs, bench.csv, plots) is gathered
# into OUT_DIR/results.tar.gz beside OUT_DIR/summary.txt (one line per stage): a call
# leaves two files. A later call with the same OUT_DIR continues the archive (its bench
# stages append to the same bench.csv); archives of separate device calls merge with
#   python3 perf/bench.py --merge A/bench.csv B/bench.csv --out perf/results/<gpu>
# A carried Triton cache (perf/triton-cache-sm90.tar.gz, built on the CPU machine with the
# GPU's Triton by `python perf/triton_cache.py build` and carried with the working tree) is
# unpacked into Triton's cache first; smoke reports how many of a stage's kernels it held.
# Only python3 is assumed (the GPU image has no `python` or `pip` command). BENCH_ARGS adds
# options to the bench stages. GPU_CHECK_DRY=1 rehearses the whole run on a CPU (a test does,
# in CI): nothing is installed, the bench stages run their --quick layers in the Triton
# interpreter, tune-check replaces the launches through the launcher's seam, and a fake
# clock (STAGE_BUDGET + 1 seconds per cell) makes every stage stop at its budget.
set -uo pipefail
out="${1:?usage: perf/gpu_check.sh OUTPUT_DIR [STAGE ...] | --list}"
shift

STAGES=(smoke fwd-bf16-cl host tune-check variants fwd-nchw train-bf16-cl grads-bf16-cl classes grads-nchw nd blocks fwd-fp16-fp32 tests sanitize)
describe() {
  case "$1" in
    smoke)         echo "install, versions, every kernel variant once on CUDA (tests/test_kernel_variants.py), the demo, host time per call, hits in a carried Triton cache" ;;
    fwd-bf16-cl)   echo "2-D suite forward, bf16 channels_last: ours vs cuDNN vs naive vs the torch sub-pixel rewrite" ;;
    host)          echo "host-bound decoder layers, bf16 channels_last, forward and training step (its backward on the device thread and inline): per call the back-to-back wall time, the kernels' own time (profiler) and a CUDA graph's replay, ours vs cuDNN; host time per call with the launch stubbed" ;;
    tune-check)    echo "8 suite layers tuned exhaustively: how far the cost model's pick and its best 6 are from the best" ;;
    variants)      echo "U-Net layers (k = s), 2-D and 3-D forward, bf16, both layouts: the phase GEMMs, the one GEMM and the experimental TMA phase GEMM (channels_last), each forced and tuned, beside the tuner's pick (TMA among its candidates) and cuDNN" ;;
    fwd-nchw)      echo "2-D suite forward, bf16 NCHW: the same four methods, and ours forced onto a channels-last copy of the input (staged) and onto the input as given (gathered)" ;;
    train-bf16-cl) echo "2-D suite forward+backward, bf16 channels_last: ours vs cuDNN, with the kernels' own time (profiler)" ;;
    grads-bf16-cl) echo "2-D suite, the forward, the input gradient and the weight gradient (with the bias's) each alone, bf16 channels_last: ours vs cuDNN, each with the kernels' own time (profiler)" ;;
    classes)       echo "the layer classes that lost by layout or width (depthwise and grouped, RGB and single-channel outputs; the 3-D suite), forward, bf16/fp16/fp32, both layouts: ours (and, where offered, the grouped kernel and the phase GEMM per group, the phase GEMMs and the phases side by side (offered to every undilated layer: TRITONDECONV_EXPERIMENTAL=phase_columns), each forced) vs cuDNN, with the kernels' own time (profiler)" ;;
    grads-nchw)    echo "2-D suite, the weight gradient and the input gradient each alone, bf16 NCHW (each also forced onto channels-last copies of its NCHW operands, and onto them as given: the weight gradient's gather table): ours vs cuDNN" ;;
    nd)            echo "1-D (HiFi-GAN) and 3-D (3-D U-Net) suites, bf16, both passes: ours vs cuDNN" ;;
    blocks)        echo "decoder blocks: folded upsample+conv vs interpolate+conv2d, fused vs unfused epilogues" ;;
    fwd-fp16-fp32) echo "2-D suite forward, fp16 and fp32 (TF32), both layouts" ;;
    tests)         echo "every cuda test, over the machine's cores when pytest-xdist is there (TRITONDECONV_FUZZ_CASES fuzz cases, default 300)" ;;
    sanitize)      echo "the cuda forward and backward tests under compute-sanitizer memcheck, caching allocator off" ;;
    *)             return 1 ;;
  esac
}
if [ "$out" = "--list" ] || [ "${1:-}" = "--list" ]; then
  for stage in "${STAGES[@]}"; do printf '%-14s %s\n' "$stage" "$(describe "$stage")"; done
  exit 0
fi
[ $# -gt 0 ] || set -- "${STAGES[@]}"
for stage in "$@"; do describe "$stage" >/dev/null || { echo "unknown stage $stage (see --list)"; exit 2; }; done

budget="${STAGE_BUDGET:-480}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"  # the stages write here; archived into $out at the end
trap 'rm -rf "$work"' EXIT
[ -f "$out/results.tar.gz" ] && tar xzf "$out/results.tar.gz" -C "$work"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
dry="${GPU_CHECK_DRY:-}"
fake=()
if [ -n "$dry" ]; then
  BENCH_ARGS="${BENCH_ARGS:---quick}"
  fake=(--fake-clock $((budget + 1)))
else
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
fi
carried="none (perf/triton_cache.py build makes one)"
if [ -n "$dry" ]; then
  carried="not used in a dry run"
elif [ -f perf/triton-cache-sm90.tar.gz ]; then
  carried="$(python3 perf/triton_cache.py unpack 2>&1)"
fi
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  else echo "no nvidia-smi"; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', torch.backends.cudnn.version())"
} | tee "$work/versions.txt"

bench() {  # bench STAGE ARGS...: warm Triton's cache for the stage on every core, then bench.py within what is left
  local stage="$1"; shift
  local begin=$SECONDS
  if [ -z "$dry" ]; then
    timeout $((budget / 2)) python3 perf/candidates.py --stages "$stage" --warm 2>&1 | tee "$work/$stage.warm.log"
  fi
  local left=$((budget - (SECONDS - begin)))
  timeout $((left + 60)) python3 perf/bench.py "$@" --budget "$left" --append --out "$work" ${BENCH_ARGS:-} "${fake[@]}" 2>&1 \
    | tee "$work/$stage.log"
  local rc="${PIPESTATUS[0]}"
  python3 perf/plot.py "$work/bench.csv" >>"$work/$stage.log" 2>&1
  return "$rc"
}

# pytest stopped at the budget by an interrupt, as by Ctrl-C: it still prints which tests
# failed among those that ran (a plain kill would lose that list).
stop_pytest=(timeout -s INT -k 30 "$budget")
status=0
calls=20  # back-to-back calls per timing of the host and per-kernel columns
[ -n "$dry" ] && calls=1  # (the interpreter takes a tenth of a second a call)
for stage in "$@"; do
  echo "=== $stage: $(describe "$stage")"
  start=$SECONDS
  case "$stage" in
    smoke)
      # The cost model's pick alone, as in the tests stage: correctness, not tuning.
      TRITONDECONV_AUTOTUNE=0 "${stop_pytest[@]}" python3 -m pytest -q -rfE -m cuda -p no:cacheprovider \
        tests/test_kernel_variants.py 2>&1 | tee "$work/smoke.log"
      rc="${PIPESTATUS[0]}"
      timeout 120 python3 -m tritondeconv.demo 2>&1 | tee "$work/demo.txt"
      # Host time per call beside cuDNN's, with the launch's own share (Triton binding the arguments).
      host_device="${dry:+cpu}"
      timeout 150 python3 perf/host_overhead.py --repeat 1000 --profile 40 --device "${host_device:-cuda}" 2>&1 | tee "$work/host.txt"
      # Did the kernels compiled on the CPU machine hit? The first bench stage's, looked up.
      if [ -f perf/triton-cache-sm90.tar.gz ] && [ -z "$dry" ]; then
        carried="$carried; $(timeout 300 python3 perf/candidates.py --stages fwd-bf16-cl --warm 2>&1 | tail -n 1)"
      fi
      echo "carried-cache: $carried" | tee -a "$out/summary.txt" ;;
    fwd-bf16-cl)   bench "$stage" --suites 2d --passes fwd --dtypes bf16 --layouts channels_last; rc=$? ;;
    host)          bench "$stage" --suites small --passes fwd,fwd+bwd,fwd+bwd-inline --dtypes bf16 --layouts channels_last \
                     --methods tritondeconv,cudnn --back-to-back "$calls"; rc=$?
                   host_device="${dry:+cpu}"
                   timeout 120 python3 perf/host_overhead.py --repeat 500 --device "${host_device:-cuda}" 2>&1 \
                     | tee "$work/host-overhead.txt" ;;
    tune-check)
      timeout $((budget + 60)) python3 perf/tune_check.py --budget "$budget" --out "$work" ${dry:+--dry-run} "${fake[@]}" 2>&1 \
        | tee "$work/$stage.log"
      rc="${PIPESTATUS[0]}" ;;
    variants)      TRITONDECONV_EXPERIMENTAL=tma bench "$stage" --suites 2d,3d --passes fwd --dtypes bf16 --cells U-Net \
                     --methods tritondeconv,phases,one_gemm,tma,cudnn; rc=$? ;;
    fwd-nchw)      bench "$stage" --suites 2d --passes fwd --dtypes bf16 --layouts nchw \
                     --methods tritondeconv,staged,gathered,cudnn,naive,subpixel_torch; rc=$? ;;
    train-bf16-cl) bench "$stage" --suites 2d --passes fwd+bwd --dtypes bf16 --layouts channels_last \
                     --back-to-back "$calls"; rc=$? ;;
    grads-bf16-cl) bench "$stage" --suites 2d --passes fwd,dgrad,wgrad --dtypes bf16 --layouts channels_last \
                     --methods tritondeconv,cudnn --back-to-back "$calls"; rc=$? ;;
    classes)       TRITONDECONV_EXPERIMENTAL=phase_columns bench "$stage" --suites classes,3d --passes fwd --dtypes bf16,fp16,fp32 \
                     --methods tritondeconv,cudnn,grouped,per_group,phases,phase_columns --back-to-back "$calls"; rc=$? ;;
    grads-nchw)    bench "$stage" --suites 2d --passes wgrad,dgrad --dtypes bf16 --layouts nchw \
                     --methods tritondeconv,staged,gathered,cudnn; rc=$? ;;
    nd)            bench "$stage" --suites 1d,3d --dtypes bf16; rc=$? ;;
    fwd-fp16-fp32) bench "$stage" --suites 2d --passes fwd --dtypes fp16,fp32; rc=$? ;;
    blocks)
      timeout $((budget + 60)) python3 perf/bench_blocks.py --budget "$budget" --out "$work" ${BENCH_ARGS:-} "${fake[@]}" 2>&1 \
        | tee "$work/$stage.log"
      rc="${PIPESTATUS[0]}" ;;
    tests)
      workers=()
      python3 -c "import xdist" 2>/dev/null && workers=(-n "$(nproc)")
      # Each failure is logged as it happens (cuda_failures.txt), should the budget stop the run before its summary.
      TRITONDECONV_FAILURE_LOG="$work/cuda_failures.txt" TRITONDECONV_FUZZ_CASES="${TRITONDECONV_FUZZ_CASES:-300}" \
        TRITONDECONV_AUTOTUNE=0 "${stop_pytest[@]}" \
        python3 -m pytest -q -rfE -m cuda -p no:cacheprovider "${workers[@]}" 2>&1 | tee "$work/cuda_tests.txt"
      rc="${PIPESTATUS[0]}" ;;
    sanitize)
      if ! command -v compute-sanitizer >/dev/null; then
        echo "$stage: skipped (no compute-sanitizer)" | tee -a "$out/summary.txt"; continue
      fi
      # Without the caching allocator, so that an access past a tensor is past an allocation.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITONDECONV_AUTOTUNE=0 "${stop_pytest[@]}" \
        compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -q -rfE -m cuda -p no:cacheprovider tests/test_forward.py tests/test_backward.py \
        -k "float16 or float64" 2>&1 | tee "$work/sanitizer.txt"
      rc="${PIPESTATUS[0]}" ;;
  esac
  case "$rc" in
    0) verdict=ok
       grep -qs "budget of .* spent" "$work/$stage.log" && verdict="stopped at its budget of ${budget} s (partial)" ;;
    124|137) verdict="stopped at its budget of ${budget} s" ;;
    *) verdict="failed (exit $rc)"; status=1 ;;
  esac
  echo "$stage: $verdict after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
done
for log in smoke.log cuda_tests.txt sanitizer.txt; do  # the tests' closing lines, and each failure
  [ -f "$work/$log" ] || continue
  echo "$log: $(grep -E "passed|failed|error|skipped" "$work/$log" | tail -n 1)" >>"$out/summary.txt"
  grep -E "^(FAILED|ERROR) " "$work/$log" | sed "s/^/  $log: /" >>"$out/summary.txt"
done
tar czf "$out/results.tar.gz" -C "$work" .
exit "$status"
