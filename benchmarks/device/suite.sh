#!/usr/bin/env bash
# The whole test suite on a GPU machine in N parallel shards (files dealt round-robin), each streaming its
# log to $OUT/suite-<i>.log as it runs (a killed shard still leaves what it ran).
# Usage: [FILES=... | FILES_FROM=list] suite.sh [N] [timeout_s]; FILES_FROM: one file or node id per line
set -uo pipefail
export PYTHONUNBUFFERED=1  # a shard killed by the timeout keeps what it printed (block-buffered output is lost)
# One CPU thread per shard unless told: 10 shards of 16 threads each on 16 cores did not finish in 540 s
# (2026-12-04, session 13); with one thread each, 12 shards ran the whole suite in 189 s.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
cd "$(dirname "$0")/../.."
# The onnxruntime-gpu wheel, when ../shared/device/stage.sh brought it (installed into /tmp/site): without it
# the ONNX Runtime CUDA tests skip (session 14: 4 skips).
[ -d /tmp/site/onnxruntime ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}; N=${1:-3}; LIMIT=${2:-420}
mkdir -p "$OUT"
# FILES (space-separated test files or node ids) to run only those, e.g. the ones a round has not run yet
if [ -n "${FILES_FROM:-}" ]; then mapfile -t files <"$FILES_FROM"
elif [ -n "${FILES:-}" ]; then read -r -a files <<<"$FILES"; else files=(tests/test_*.py); fi
for ((i = 0; i < N; i++)); do
  shard=(); for ((j = i; j < ${#files[@]}; j += N)); do shard+=("${files[j]}"); done
  timeout "$LIMIT" python -m pytest -q -rfEs -p no:cacheprovider --durations=8 "${shard[@]}" >"$OUT/suite-$i.log" 2>&1 &
done
wait
for ((i = 0; i < N; i++)); do echo "shard $i: $(grep -E '(passed|failed|error)' "$OUT/suite-$i.log" | tail -1)"; done
grep -h "^FAILED\|^ERROR" "$OUT"/suite-*.log || true
