#!/usr/bin/env bash
# One device call of a GPU round (see benchmarks/NOTES.md): build the CUDA extension, then the named steps.
#   bash benchmarks/device/gpu_round.sh tests profile bench      # results under $OUT (default out/gpu)
# Steps: selftest (csrc/kernels_selftest.cu against its float64 reference), tests (GPU tests of the fused
# paths; TESTS_K narrows them with pytest -k), sweep (benchmarks/device/kernel_sweep.py; SWEEP=attention,
# sampler or groupnorm, default attention), profile (benchmarks.profile, every lever A/B in one process),
# bench (benchmarks.bench, d16 and d30 at batch 1 and 64 with the official-style baseline, and the official code
# itself when a checkout of it is at $OFFICIAL_SRC, default out/official-var), agreement (greedy FP16 tokens of
# torch and cudagraph against the official code's autocast run, per scale; needs that checkout), suite (all tests).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD VAR_RT_FIXTURES=${VAR_RT_FIXTURES:-$PWD/.fixtures}  # carry .fixtures
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >"$OUT/gpu.txt"
t0=$(date +%s)
if [ -n "${SKIP_BUILD:-}" ] && ls var_rt/_var_rt_ops*.so >/dev/null 2>&1; then
  echo "extension already built"
elif ! PYTHON=$PY bash csrc/build.sh >"$OUT/build.log" 2>&1; then tail -30 "$OUT/build.log"; exit 1
else echo "extension built in $(( $(date +%s) - t0 )) s"; fi
VARIANTS=${VARIANTS:-"default"}
for step in "$@"; do
  t=$(date +%s)
  case "$step" in
    selftest)
      nvcc -std=c++17 -arch=sm_90 -O2 -o /tmp/var_rt_selftest csrc/kernels_selftest.cu && /tmp/var_rt_selftest \
        | tee "$OUT/selftest.log" | grep -v "^ok" ;;
    tests)
      $PY -m pytest -q -x tests/test_ops.py tests/test_cuda_backends.py tests/test_fused_sampler.py \
        tests/test_sampling.py tests/test_attention_kernel.py tests/test_guidance_kernel.py tests/test_block_kernels.py \
        tests/test_groupnorm_kernel.py -k "${TESTS_K:-not slow}" 2>&1 | tail -25 | tee "$OUT/tests.log" ;;
    sweep)
      $PY benchmarks/device/kernel_sweep.py --only "${SWEEP:-attention}" --out "$OUT/kernel-sweep-${SWEEP:-attention}.json" \
        2>&1 | grep "^\[" ;;
    suite)
      $PY -m pytest -q tests/ 2>&1 | tail -40 | tee "$OUT/suite.log" ;;
    profile)
      args=(); for v in $VARIANTS; do args+=(--variant "$v"); done
      $PY -m benchmarks.profile --model ${MODEL:-d16} --batch-sizes ${BATCHES:-1 64} "${args[@]}" ${PROFILE_ARGS:-} \
        --out "$OUT/profile-${MODEL:-d16}${PROFILE_TAG:-}.json" 2>&1 | grep -v Warning | cut -c1-400 ;;
    bench)
      src=${OFFICIAL_SRC:-out/official-var}  # a checkout of FoundationVision/VAR (carry it): the official code too
      base=(--baselines official); [ -f "$src/models/var.py" ] && base=(--baselines official,official-code --official-src "$src")
      $PY -m benchmarks.bench --model ${BENCH_MODELS:-d16 d30} --batch-sizes ${BENCH_BATCHES:-1 64} --backends cudagraph "${base[@]}" \
        --dtype float16 --iters 10 --warmup 2 --instrument-runs 0 --out-dir "$OUT/bench" \
        --time-budget-s ${BENCH_BUDGET:-400} 2>&1 | tail -15 ;;
    agreement)  # greedy FP16 tokens per scale against the official code's autocast run (needs its checkout)
      $PY -m benchmarks.agreement --model ${AGREE_MODELS:-d16 d30} --backends official-code torch cudagraph \
        --dtype float16 --batch ${AGREE_BATCH:-16} --official-src "${OFFICIAL_SRC:-out/official-var}" \
        --out "$OUT/agreement-official.json" 2>&1 | grep -v Warning | cut -c1-400 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "step $step: $(( $(date +%s) - t )) s"
done
