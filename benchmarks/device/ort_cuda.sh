#!/usr/bin/env bash
# The ONNX Runtime CUDA round (issue 23), after the onnxruntime-gpu wheel was staged (bash
# ../shared/device/stage.sh onnxruntime-gpu==1.31.1 here; one device call per part, back to back, each
# carrying .devstage/bin and .devstage/pNN and running bash .devstage/bin/recv.sh). Two steps, one call each
# (the machine keeps /tmp between warm calls); both carry .devstage/bin and .fixtures. Results under $OUT:
#   bash benchmarks/device/ort_cuda.sh bench    export d16 FP16 (B1, B16); bench/ d16 B1/B16: cudagraph,
#                                               onnxruntime (CUDA EP: ORT CUDA graphs, the same with every ORT
#                                               optimiser on, dynamic graphs); ORT_VARIANTS='name={engine
#                                               options}|...' for others, NO_CUDAGRAPH=1 to leave cudagraph out
#   bash benchmarks/device/ort_cuda.sh checks   ort-tests.log (the ORT CUDA tests), agreement-ort.json (greedy
#                                               tokens per scale: torch, cudagraph, onnxruntime FP16, d16, B16),
#                                               ort-transfers.json (node placement, kernels and host copies per generation)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD VAR_RT_FIXTURES=${VAR_RT_FIXTURES:-$PWD/.fixtures}
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
EXP=/tmp/d16-fp16
bash .devstage/bin/recv.sh >/dev/null || { echo "wheel not installed"; exit 1; }
python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" || exit 1
# logs under /tmp (the device tool returns at most 8 files from $OUT), shown when a step fails
ls var_rt/_var_rt_ops*.so >/dev/null 2>&1 || bash csrc/build.sh >/tmp/build.log 2>&1 || tail -5 /tmp/build.log
export_once() {  # d16 FP16 at batch 1 and 16, once per machine (/tmp stays while the machine is warm)
  [ -f $EXP/manifest.json ] && return
  local t=$(date +%s)
  python -m export.build --model d16 --random-weights --fp16 --batch-size 1 16 --out-dir $EXP --onnx-only \
    --no-progress >/tmp/export.log 2>&1 || { tail -5 /tmp/export.log; exit 1; }
  echo "export $(( $(date +%s) - t )) s"
}
for step in "$@"; do
  t=$(date +%s)
  case "$step" in
    bench)
      export_once  # the official-style baseline once, in the cudagraph process
      [ -n "${NO_CUDAGRAPH:-}" ] || timeout 150 python -m benchmarks.bench --model d16 --batch-sizes 1 16 --backends cudagraph --dtype float16 \
        --iters 10 --warmup 2 --instrument-runs 0 --out-dir "$OUT/bench-cudagraph" 2>&1 | grep "^\[bench\]"
      variants=('graphs={"cuda_graph": true}' 'graphs-fused={"cuda_graph": true, "disabled_optimizers": []}' 'dynamic={}')
      [ -z "${ORT_VARIANTS:-}" ] || IFS='|' read -r -a variants <<<"$ORT_VARIANTS"
      for v in "${variants[@]}"; do
        timeout 150 python -m benchmarks.bench --model d16 --batch-sizes 1 16 --backends onnxruntime --dtype float16 \
          --baselines none --iters 10 --warmup 2 --instrument-runs 0 --backend-arg engine_dir=$EXP "engine_options=${v#*=}" \
          --out-dir "$OUT/bench-ort-${v%%=*}" 2>&1 | grep "^\[bench\]\|Error"
      done ;;
    checks)
      [ -n "${SKIP_TESTS:-}" ] || timeout 200 python -m pytest -q -rfEs -p no:cacheprovider tests/test_pipeline_backends.py \
        tests/test_engines_onnxruntime.py -k "cuda" >"$OUT/ort-tests.log" 2>&1; tail -5 "$OUT/ort-tests.log"
      export_once
      timeout 200 python -m benchmarks.agreement --model d16 --backends torch cudagraph onnxruntime --engine-dir $EXP \
        --dtype float16 --batch 16 --out "$OUT/agreement-ort.json" 2>&1 | grep "^\[agreement" | cut -c1-600
      timeout 150 python benchmarks/device/ort_transfers.py --engine-dir $EXP --batch 1 --profile-batches 1 16 ${TRANSFER_ARGS:-} \
        --out "$OUT/ort-transfers.json" 2>&1 | grep "^\[" | cut -c1-700 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "step $step: $(( $(date +%s) - t )) s"
done
