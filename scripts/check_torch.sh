#!/usr/bin/env bash
# Builds, installs and op-tests disalign_ops against one torch release, in a venv of its own:
#
#   bash scripts/check_torch.sh VERSION [pytest args...]      e.g. 2.13.0 (CI), 2.11.0, 2.15.0
#
# 1. creates the venv (DISALIGN_VENV, default .venvs/torch-VERSION) unless it exists, installs
#    torch==VERSION and the test dependencies (no triton beyond what torch itself pulls in);
# 2. builds a wheel from a copy of the working tree (`pip wheel --no-build-isolation`) and installs
#    it: the non-editable path a user takes. The CUDA half is built when torch is a CUDA build and a
#    toolkit is found (scripts/cuda_env.sh), unless DISALIGN_CUDA=0;
# 3. checks that the installed package loads its native kernels (and, for a CUDA build, that the
#    .so holds the default SASS and PTX: .ci/check_cuda.sh --so);
# 4. runs the op tests (every tests/test_*.py that does not import the trainers) from outside the
#    source tree, so the installed wheel is what they import.
#
# The exact pin makes the machine-wide pip cap (/etc/xdg/pip/constraints.txt, which keeps unpinned
# installs on the releases of the local mirror) unnecessary, so it is lifted for this script only
# (a newer torch, e.g. 2.15, is not under the cap). CUDA builds of torch download ~1 GB of torch
# plus ~3 GB of CUDA libraries from the registry; CPU wheels (2.13.0+cpu on the local mirror) are fast.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
version=${1:?usage: scripts/check_torch.sh TORCH_VERSION [pytest args...]}
shift
venv=${DISALIGN_VENV:-.venvs/torch-$version}
export PIP_CONSTRAINT=/dev/null

step() { echo "check_torch[$version] $(date -u +%H:%M:%S) $*"; }
SECONDS=0

step "venv $venv"
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
py="$(cd "$venv" && pwd)/bin/python"
"$py" -m pip install --quiet --upgrade pip
step "pip install torch==$version"
# One resolve, so the build tools stay within what this torch accepts (torch 2.11: setuptools<82).
"$py" -m pip install --quiet "torch==$version" "setuptools>=64" wheel ninja numpy pytest expecttest hypothesis \
  pytest-benchmark
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The Triton backend's tests run its kernels under TRITON_INTERPRET=1 here. Triton 3.6's
# interpreter (torch 2.11's) turns 1-element arrays into Python ints, which NumPy 2.4 no longer
# allows ("only 0-dimensional arrays can be converted to Python scalars"): probe it, and where it
# fails, fall back to the newest NumPy before 2.4 for this venv.
if ! "$py" scripts/probe_triton_interpreter.py; then
  step "Triton's interpreter fails with this NumPy: installing numpy<2.4"
  "$py" -m pip install --quiet "numpy<2.4"
  "$py" scripts/probe_triton_interpreter.py
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/disalign-check-XXXXXX")
trap 'rm -rf "$work"' EXIT
# The working tree as it is (tracked and untracked-but-not-ignored files), without build outputs.
git ls-files -co --exclude-standard -z | (mkdir -p "$work/src" && tar --null -T - -cf - | tar -xf - -C "$work/src")

# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh "$py"
step "pip wheel (DISALIGN_CUDA=${DISALIGN_CUDA:-auto}, CUDA_HOME=${CUDA_HOME:-none})"
start=$SECONDS
(cd "$work/src" && "$py" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" .)
step "wheel built in $((SECONDS - start)) s: $(cd "$work/dist" && ls)"
"$py" -m pip install --quiet --force-reinstall --no-deps "$work"/dist/disalign_ops-*.whl

cd "$work"  # away from the source tree: the tests import the installed package
"$py" - <<'PY'
import torch, disalign_ops
from disalign_ops import backends
print("installed:", disalign_ops.__file__)
print("backends on cpu:", disalign_ops.available_backends("cpu"))
assert disalign_ops._has_ops(), f"the native extension did not load: {backends.native_import_error()}"
cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("disalign::cross_entropy", "CUDA")
print("CUDA kernels registered:", cuda_kernels)
PY
so=$("$py" -c "import disalign_ops._C as c; print(c.__file__)")
if "$py" -c "import torch, disalign_ops, sys; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('disalign::cross_entropy', 'CUDA') else 1)"; then
  PYTHON="$py" bash "$root/.ci/check_cuda.sh" --so "$so"
fi

mapfile -t op_tests < <(cd "$root" && grep -L "disalign_train" tests/test_*.py)
step "pytest: ${#op_tests[@]} op test files"
start=$SECONDS
"$py" -m pytest -p no:cacheprovider "${op_tests[@]/#/$work/src/}" "$@"
step "op tests took $((SECONDS - start)) s; all steps $SECONDS s"
