#!/usr/bin/env bash
# Compiles csrc/bindings.cpp with WITH_CUDA (syntax only) against a CUDA build of torch's headers,
# so the CUDA half of the bindings is checked on a machine whose installed torch has no CUDA. The
# headers come from a CUDA torch wheel already on this disk (ROBERTA_FAST_TORCH_CUDA_WHEEL, or the
# local package mirror); with none, the check says it did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
wheel=${ROBERTA_FAST_TORCH_CUDA_WHEEL:-}
if [ -z "$wheel" ]; then
  wheel=$(ls /opt/pypi*/files/torch-2.*-cp3*-manylinux*_x86_64.whl 2>/dev/null | grep -v '+cpu' | sort -V | tail -1 || true)
fi
cuda_home=${CUDA_HOME:-/usr/local/cuda}
if [ -z "$wheel" ] || [ ! -f "$cuda_home/include/cuda_runtime_api.h" ]; then
  echo "CUDA bindings check: NOT RUN (no CUDA torch wheel, or no CUDA toolkit at $cuda_home)"
  exit 0
fi
inc=build/torch-cuda-headers
stamp="$inc/.from-$(basename "$wheel")"
if [ ! -f "$stamp" ]; then
  rm -rf "$inc" && mkdir -p "$inc"
  unzip -q -o "$wheel" 'torch/include/*' -d "$inc"
  touch "$stamp"
fi
g++ -std=c++20 -fsyntax-only -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc \
  -I"$inc/torch/include" -I"$inc/torch/include/torch/csrc/api/include" -I"$cuda_home/include" \
  -I"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
  -I"$("$PY" -c 'import pybind11; print(pybind11.get_include())')" csrc/bindings.cpp
echo "CUDA bindings check: bindings.cpp compiles with WITH_CUDA against $(basename "$wheel") headers"
