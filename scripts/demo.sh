#!/usr/bin/env bash
# The main job: installs, then trains digits-lt end to end (stage 1, baselines, DisAlign stage 2)
# and prints the comparison table. Extra arguments go to `disalign-train classify`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
disalign-train classify --out runs/digits-lt "$@"
