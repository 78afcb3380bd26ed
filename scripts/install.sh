#!/usr/bin/env bash
# Installs disalign_ops and everything its demo and tests need, on a fresh machine or an existing one,
# into the current `python` (CI's main job).
#
# 1. torch==2.14.1 and torchvision==0.29.1 (DISALIGN_TORCH_VERSION / DISALIGN_TORCHVISION_VERSION
#    override them), pinned: a bare `torch` would pull whatever is newest. 2.14.1 is a CUDA 13.0 build
#    of torch; without a GPU it runs on the CPU.
# 2. The extension, editable, against that torch (no build isolation: an isolated build cannot see
#    it), with the CUDA half built for real when torch is a CUDA build and a toolkit is found
#    (scripts/cuda_env.sh sets CUDA_HOME and CPATH; DISALIGN_CUDA=0 builds CPU-only).
# 3. Imports the package and fails unless the native kernels loaded (the package would otherwise
#    fall back to its pure-Python backends without a word).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# One resolve, so the build tools stay within what the chosen torch accepts (torch 2.11: setuptools<82).
python -m pip install --quiet "torch==${DISALIGN_TORCH_VERSION:-2.14.1}" \
  "torchvision==${DISALIGN_TORCHVISION_VERSION:-0.29.1}" "setuptools>=64" wheel ninja
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh python
python -m pip install --quiet --no-build-isolation -e ".[test,triton,train]"
python - <<'PY'
import torch, disalign_ops
from disalign_ops import backends
assert disalign_ops._has_ops(), f"the native extension did not load: {backends.native_import_error()}"
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("disalign::cross_entropy", "CUDA")
print(f"install: torch {torch.__version__}, disalign_ops {disalign_ops.__version__}, "
      f"CUDA kernels {'built' if cuda else 'not built'}, backends on cpu: {disalign_ops.available_backends('cpu')}")
PY
