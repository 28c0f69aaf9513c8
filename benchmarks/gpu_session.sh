#!/usr/bin/env bash
# One command for a lent GPU machine (see DESIGN.md, "GPU sessions"): builds the extension with the
# torch, nvcc and ninja already there (no network), runs the CUDA ctest programs, `pytest -m gpu`
# and the GPU benchmarks, and writes logs and result JSON under $OUT (at most 8 files come back).
#
#   bash benchmarks/gpu_session.sh [all|test|bench|profile]   (default: all)
#
# Each phase has its own time limit so that one call (10 minutes at most) always returns its logs.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
OUT=${OUT:-/tmp/roberta_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
jobs=$(nproc)

say() { echo "=== $(date +%T) $*"; }

{
  say "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" || true

  say "build (sm_90a, $jobs jobs)"
  start=$(date +%s)
  # Only the architecture of the machine at hand: half the compile time of the 8.0+9.0a default.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=$jobs \
    timeout 420 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - start )) s"
  grep -E "error|spill stores" "$OUT/build.log" | grep -v " 0 bytes spill" | head -40
  [ $rc -eq 0 ] || { tail -60 "$OUT/build.log"; exit 1; }
  "$PY" -c "import roberta_fast; print('backends:', roberta_fast.available_backends())"
} 2>&1 | tee "$OUT/session.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

if [ "$phase" = all ] || [ "$phase" = test ]; then
  {
    say "CUDA test programs (ctest)"
    cmake -S . -B build/gpu -G Ninja -DPython3_EXECUTABLE="$(command -v "$PY")" > /dev/null \
      && timeout 300 cmake --build build/gpu -j "$jobs" > build/gpu-build.log 2>&1 \
      && (cd build/gpu && timeout 120 ctest --output-on-failure) \
      || { echo "cmake/ctest failed"; tail -40 build/gpu-build.log 2>/dev/null; }
    say "pytest -m gpu"
    timeout 420 "$PY" -m pytest tests -m gpu -q -rs -x --junitxml="$OUT/pytest-gpu.xml" -p no:cacheprovider
    echo "pytest rc=$?"
  } 2>&1 | tee "$OUT/test.log"
fi

if [ "$phase" = all ] || [ "$phase" = bench ]; then
  {
    say "benchmarks"
    timeout 480 "$PY" -m roberta_fast.cli bench --device cuda --dtype bf16 --out "$OUT" --plot \
      ${BENCH_ARGS:---quick}
    echo "bench rc=$?"
  } 2>&1 | tee "$OUT/bench.log"
fi

if [ "$phase" = profile ]; then
  {
    say "profile: base, batch 32 x 512, realistic lengths, unpad, bf16"
    timeout 480 "$PY" -m roberta_fast.cli profile --config base --batch 32 --seq 512 --steps 20 \
      --amp bf16 --unpad --lengths uniform --device cuda --out "$OUT"
    echo "profile rc=$?"
  } 2>&1 | tee "$OUT/profile.log"
fi
