#!/usr/bin/env bash
# Sets up (scripts/setup.sh), builds the native kernels with CMake and runs ctest (which also
# proves the CUDA sources compile where nvcc exists), syntax-checks the CUDA half of the bindings,
# then runs the Python test suite, and its Hugging Face part again on older transformers releases.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh

build=${ROBERTA_FAST_CMAKE_BUILD:-build/cmake}
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DPython3_EXECUTABLE="$(command -v "$PY")" > "$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
if ! cmake --build "$build" -j "$(nproc)" > "$build/build.log" 2>&1; then
  cat "$build/build.log"; exit 1
fi
# ptxas -v: registers and spills of every CUDA kernel, so a spill shows in the log.
grep -E "spill stores|warning" "$build/build.log" | sort | uniq -c | sort -rn | head -20 || true
(cd "$build" && ctest --output-on-failure)
bash scripts/check_cuda_bindings.sh

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
"$PY" -m pytest tests "$@"
bash scripts/test_triton.sh  # the GPU compile of every Triton kernel, on Triton 3.6 as well

# The Hugging Face integration against the oldest supported transformers releases as well
# (ROBERTA_FAST_TRANSFORMERS="" skips this; a list of versions replaces the default ones).
if [ "${ROBERTA_FAST_TRANSFORMERS-default}" = default ]; then
  bash scripts/test_transformers.sh
elif [ -n "$ROBERTA_FAST_TRANSFORMERS" ]; then
  # shellcheck disable=SC2086
  bash scripts/test_transformers.sh $ROBERTA_FAST_TRANSFORMERS
fi
