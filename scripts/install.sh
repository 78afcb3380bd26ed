#!/usr/bin/env bash
# Installs disalign_ops and everything its demo and tests need, on a fresh machine or an existing one.
# torch is pinned to the local CPU wheel first (an unpinned `torch` would pull several GB of CUDA
# packages), then the extension is built against it without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==${DISALIGN_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
python -m pip install --quiet --no-build-isolation -e ".[test,triton]"
