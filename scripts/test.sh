#!/usr/bin/env bash
# The test command (CI runs exactly this): installs, compile-checks the CUDA sources with nvcc where
# nvcc exists, then runs the test suite. Triton tests run on the CPU through the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash .ci/check_cuda.sh
python -m pytest tests/ "$@"
