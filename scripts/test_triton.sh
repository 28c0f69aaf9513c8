#!/usr/bin/env bash
# Compiles every Triton kernel for sm_80 and sm_90a (tests/test_triton_compile.py) with other
# Triton releases, each in its own virtual environment layered over the current Python (torch and
# the built roberta_fast are shared; only triton differs). The default is the release the GPU
# machines run; the current Python's own Triton is covered by the main test run.
#   bash scripts/test_triton.sh [VERSION ...]    (default: 3.6.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.6.0)

for version in "${versions[@]}"; do
  venv=build/venv-triton-$version
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "triton==$version" \
    2> >(grep -v "^WARNING" >&2)
  got=$("$venv/bin/python" -c "import triton; print(triton.__version__)")
  [ "$got" = "$version" ] || { echo "venv has triton $got, not $version" >&2; exit 1; }
  echo "== triton $version"
  # -rA prints the register / spill table of the passing tests too.
  "$venv/bin/python" -m pytest -q -rA -p no:cacheprovider tests/test_triton_compile.py
done
