#!/usr/bin/env bash
# Runs the tests that touch Hugging Face models against other transformers releases, each in its
# own virtual environment layered over the current Python (so torch, triton and the built
# roberta_fast are shared and only transformers and what it pins differ).
#   bash scripts/test_transformers.sh [VERSION ...]    (default: the oldest releases supported)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.57.6 5.0.0)
tests=(tests/test_patch.py tests/test_training.py tests/test_attention_module.py
       tests/test_masking.py tests/test_padding.py tests/test_masked_lm_loss.py
       tests/test_regimes.py)

for version in "${versions[@]}"; do
  venv=build/venv-transformers-$version
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version" \
    2> >(grep -v "^WARNING" >&2)
  got=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
  [ "$got" = "$version" ] || { echo "venv has transformers $got, not $version" >&2; exit 1; }
  echo "== transformers $version"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" -m "not gpu"
done
