#!/usr/bin/env bash
# The ONNX Runtime CUDA round (issue 23) in one device call, after the onnxruntime-gpu wheel was staged
# (bash ../shared/device/stage.sh onnxruntime-gpu==1.31.1 here; one call per part, back to back, each
# carrying .devstage/bin and .devstage/pNN and running bash .devstage/bin/recv.sh). This call carries
# .devstage/bin and .fixtures. Results under $OUT:
#   ort-tests.log       the ORT CUDA tests (ordering with the caller's stream, CUDA graphs, greedy fixtures)
#   agreement-ort.json  greedy tokens per scale, torch FP16 against onnxruntime FP16 (d16, random weights)
#   bench/              d16 B1/B16: cudagraph, onnxruntime (CUDA EP), onnxruntime with ORT CUDA graphs
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD VAR_RT_FIXTURES=${VAR_RT_FIXTURES:-$PWD/.fixtures}
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
bash .devstage/bin/recv.sh || exit 1
python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" || exit 1
[ -n "${SKIP_BUILD:-}" ] || bash csrc/build.sh >"$OUT/build.log" 2>&1 || tail -5 "$OUT/build.log"
timeout 240 python -m pytest -q -rfEs -p no:cacheprovider tests/test_pipeline_backends.py tests/test_engines_onnxruntime.py \
  -k "cuda" >"$OUT/ort-tests.log" 2>&1; tail -5 "$OUT/ort-tests.log"
EXP=/tmp/d16-fp16
t=$(date +%s)
python -m export.build --model d16 --random-weights --fp16 --batch-size 1 16 --out-dir $EXP --onnx-only --no-progress \
  >"$OUT/export.log" 2>&1 || { tail -5 "$OUT/export.log"; exit 1; }
echo "export $(( $(date +%s) - t )) s"
timeout 150 python -m benchmarks.agreement --model d16 --backends torch onnxruntime --engine-dir $EXP --batch 1 \
  --out "$OUT/agreement-ort.json" 2>&1 | grep "^\[agreement"
for opts in '{}' '{"cuda_graph": true}'; do
  timeout 200 python -m benchmarks.bench --model d16 --batch-sizes 1 16 --backends onnxruntime --dtype float16 \
    --iters 10 --warmup 2 --instrument-runs 0 --backend-arg engine_dir=$EXP "engine_options=$opts" \
    --out-dir "$OUT/bench-ort-$( [ "$opts" = '{}' ] && echo plain || echo graphs )" 2>&1 | grep "^\[bench\]"
done
timeout 200 python -m benchmarks.bench --model d16 --batch-sizes 1 16 --backends cudagraph --dtype float16 \
  --iters 10 --warmup 2 --instrument-runs 0 --out-dir "$OUT/bench-cudagraph" 2>&1 | grep "^\[bench\]"
