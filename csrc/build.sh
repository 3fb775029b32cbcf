#!/usr/bin/env bash
# Build the CUDA extension and install it as var_rt/_var_rt_ops.so (needs a CUDA build of torch and nvcc).
#   csrc/build.sh            # sm_90 (H100/H200)
#   CUDA_ARCH="80;90" csrc/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B build "${GEN[@]}" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" ${CMAKE_ARGS:-}
cmake --build build -j "${JOBS:-$(nproc)}"
cmake --install build
"$PYTHON" -c 'from var_rt import ops; assert ops.extension_loaded(), ops.extension_error(); print("var_rt CUDA extension loaded")'
