#!/usr/bin/env bash
# Installs what roberta_fast needs into the current Python and builds the extension in place.
# An installed torch is kept as it is (CPU or CUDA build); with none, torch==2.13.0 is installed,
# which on a CPU-only machine here is the CPU build that lies on disk (an unpinned torch would pull
# several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${ROBERTA_FAST_TORCH:-2.13.0}"
fi
# Only what is missing, so that a GPU machine's torch-matched triton is never replaced.
missing=$("$PY" - <<'PYEOF'
import importlib.util
wanted = {"triton": "triton", "pybind11": "pybind11", "ninja": "ninja", "numpy": "numpy",
          "rich": "rich", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
          "transformers": "transformers", "accelerate": "accelerate", "matplotlib": "matplotlib",
          "setuptools": "setuptools"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $missing
fi
# --no-deps: the dependencies are in place above, and a resolver must never swap torch.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import roberta_fast; print('roberta_fast backends:', roberta_fast.available_backends())"
