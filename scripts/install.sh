#!/usr/bin/env bash
# Installs bayesflow and its test tools, reusing an installed torch. Where none is installed it takes
# the CPU build that pip finds on this kind of machine instead of a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${BAYESFLOW_TORCH_VERSION:-2.13.0}"

fi
"$PY" -m pip install -q -e ".[test,extras,integrations,docs]"
