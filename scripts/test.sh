#!/usr/bin/env bash
# The test command (CI's main job, through .ci/run): installs (scripts/install.sh: torch 2.14.1, the
# extension with its CUDA half where nvcc exists), checks the CUDA side with .ci/check_cuda.sh (ptxas
# spills; SASS/PTX targets of the built library), then runs the whole test suite (tests/, then the
# scripts' tests in benches/). Triton tests run on the CPU through the interpreter; GPU tests skip
# without a GPU. Each step prints its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
timed() { local start=$SECONDS; "$@"; echo "test.sh: '$*' took $((SECONDS - start)) s"; }
timed bash scripts/install.sh
timed bash .ci/check_cuda.sh
# Report only (issue 9's instruction budget of the GPU kernels, read from SASS; no GPU needed).
timed python benches/sass_budget.py --out "${TMPDIR:-/tmp}/disalign-sass-budget" \
  || echo "test.sh: benches/sass_budget.py failed (report only, not a test)"
timed python -m pytest tests/ "$@"
# The benchmark and gpu_check scripts' own tests (the timed suite skips). A run of its own: both
# folders' tests import their own conftest.py by that name.
timed python -m pytest benches/ "$@"
