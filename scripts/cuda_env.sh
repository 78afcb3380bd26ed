# Sourced by install.sh and check_torch.sh: `source scripts/cuda_env.sh PYTHON`. Prepares the
# environment of a CUDA build of the extension against PYTHON's torch, when that torch is a CUDA
# build and DISALIGN_CUDA is not 0:
#  - CUDA_HOME: kept when set; else the first toolkit (bin/nvcc and include/cuda_runtime_api.h) of
#    $CUDA_PATH, /usr/local/cuda, or the real location of the `nvcc` on PATH. torch's own guess is
#    dirname(dirname(which nvcc)), wrong when `nvcc` is a wrapper script (e.g. /usr/local/bin/nvcc).
#  - CPATH: torch's CUDA headers include the CUDA libraries' headers (cublas_v2.h, cusparse.h, ...);
#    when the toolkit lacks them, the ones pip installed with torch (site-packages/nvidia/*/include).
#  - DISALIGN_CUDA=1 when a toolkit was found (so a broken CUDA build fails instead of silently
#    building CPU-only); left unset otherwise, with a message.
_disalign_py=${1:-python}
if [[ "${DISALIGN_CUDA:-}" != "0" ]] && "$_disalign_py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  if [[ -z "${CUDA_HOME:-}" ]]; then
    _disalign_nvcc=$(command -v nvcc || true)
    # A wrapper script is not a symlink: read the path it execs (`exec /path/to/nvcc "$@"`).
    if [[ -n "$_disalign_nvcc" ]] && head -c 2 "$_disalign_nvcc" | grep -q '#!'; then
      _disalign_nvcc=$(grep -o '/[^ "]*/bin/nvcc' "$_disalign_nvcc" | head -n 1 || true)
    fi
    for _disalign_dir in "${CUDA_PATH:-}" /usr/local/cuda \
        ${_disalign_nvcc:+"$(dirname "$(dirname "$(readlink -f "$_disalign_nvcc")")")"}; do
      if [[ -n "$_disalign_dir" && -x "$_disalign_dir/bin/nvcc" && -f "$_disalign_dir/include/cuda_runtime_api.h" ]]; then
        export CUDA_HOME=$_disalign_dir
        break
      fi
    done
  fi
  if [[ -n "${CUDA_HOME:-}" ]]; then
    export DISALIGN_CUDA=1
    if [[ ! -f "$CUDA_HOME/include/cublas_v2.h" ]]; then
      _disalign_inc=$("$_disalign_py" - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = sorted({os.path.dirname(h) for p in nvidia.__path__ for h in glob.glob(os.path.join(p, "*", "include", "cublas_v2.h"))})
print(os.pathsep.join(dirs))
PY
)
      if [[ -n "$_disalign_inc" ]]; then
        export CPATH="$_disalign_inc${CPATH:+:$CPATH}"
      fi
    fi
    echo "cuda_env: CUDA build with CUDA_HOME=$CUDA_HOME${CPATH:+ CPATH=$CPATH}"
  else
    echo "cuda_env: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME): building CPU-only"
  fi
fi
unset _disalign_py _disalign_nvcc _disalign_dir _disalign_inc
