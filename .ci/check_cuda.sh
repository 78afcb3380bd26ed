#!/usr/bin/env bash
# Compile check of the CUDA kernels without a GPU or a CUDA build of torch.
#
# 1. Every csrc/cuda/*.cu is compiled with plain nvcc for sm_80 and sm_90, with the flags torch's
#    BuildExtension adds that change what compiles (no implicit half/bfloat16 conversions), and
#    ptxas prints each kernel's registers, stack frame and spills.
# 2. Fails if a tile or reduction kernel spills to local memory.
# 3. Checks the extension built for real (scripts/install.sh builds it with DISALIGN_CUDA=1 against a
#    CUDA build of torch): its CUDA kernels are registered, and `cuobjdump` finds SASS and PTX for
#    exactly the configured targets (default sm_80 + sm_90 SASS, compute_90 PTX).
#
#   bash .ci/check_cuda.sh              steps 1-3 (step 3 skipped where the extension or CUDA torch is absent)
#   bash .ci/check_cuda.sh --so LIB     step 3 only, on LIB (scripts/check_torch.sh uses it)
# The .cu files see only -Icsrc (no torch include path), so step 1 also fails if they, or the
# csrc/common/layout.h they include, pull in a torch header.
# Skips (exit 0) with a message when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}  # the interpreter whose torch and disalign_ops step 3 checks

# cuobjdump: the toolkit's, or the copy Triton's package carries (pip toolkits may lack it).
find_cuobjdump() {
  local dir
  for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin \
      "$("$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))' 2>/dev/null)"; do
    if [[ -x "$dir/cuobjdump" ]]; then echo "$dir/cuobjdump"; return; fi
  done
  command -v cuobjdump || true
}

check_library() {  # LIB: CUDA kernels registered, embedded SASS/PTX == the configured targets
  local so=$1 tool
  tool=$(find_cuobjdump)
  if [[ -z "$tool" ]]; then
    echo "check_cuda: FAILED - no cuobjdump (set CUDA_HOME, or pip install triton which carries one)"
    return 1
  fi
  # From / : the import below must find the installed package, not a source tree in the current folder.
  (cd / && "$PYTHON" - "$so" "$tool" "$root/disalign_ops/_cuda_arch.py") <<'PY'
import importlib.util, os, re, subprocess, sys
so, tool, cuda_arch_py = sys.argv[1:]
spec = importlib.util.spec_from_file_location("cuda_arch", cuda_arch_py)
cuda_arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_arch)
want_sass, want_ptx = cuda_arch.embedded_targets(cuda_arch.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")))
def listed(kind):
    out = subprocess.run([tool, f"--list-{kind}", so], capture_output=True, text=True).stdout
    return set(re.findall(rf"\.(sm_\d+[af]?)\.{'cubin' if kind == 'elf' else 'ptx'}$", out, re.M))
sass = listed("elf")
ptx = {t.replace("sm_", "compute_") for t in listed("ptx")}
print(f"check_cuda: {os.path.basename(so)}: SASS {sorted(sass)}, PTX {sorted(ptx)} "
      f"(want SASS {sorted(want_sass)}, PTX {sorted(want_ptx)})")
import torch, disalign_ops
registered = torch._C._dispatch_has_kernel_for_dispatch_key("disalign::cross_entropy", "CUDA")
print(f"check_cuda: CUDA kernels registered in torch.ops.disalign: {registered}")
sys.exit(0 if (sass, ptx) == (want_sass, want_ptx) and registered else 1)
PY
}

if [[ "${1:-}" == "--so" ]]; then
  check_library "${2:?usage: .ci/check_cuda.sh --so LIB}" && echo "check_cuda: OK" && exit 0
  echo "check_cuda: FAILED (targets in ${2} differ from the configured ones, or no CUDA kernels)"
  exit 1
fi

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: SKIPPED - nvcc not found (set NVCC or install the CUDA toolkit)"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "check_cuda: $("$NVCC" --version | tail -n 1)"
flags=(-c -O3 -Icsrc
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Xptxas -v)
# The partial-sum budget constants, from their one definition (disalign_ops/_gpu_plan.py), as setup.py passes them.
mapfile -t plan_macros < <(python3 -c "import runpy; [print(f'-D{k}={v}') for k, v in runpy.run_path('disalign_ops/_gpu_plan.py')['compiler_macros']()]")
flags+=("${plan_macros[@]}")
status=0
for src in csrc/cuda/*.cu; do
  log="$work/$(basename "$src").log"
  if ! "$NVCC" "${flags[@]}" "$src" -o "$work/$(basename "$src").o" >"$log" 2>&1; then
    cat "$log"
    echo "check_cuda: FAILED to compile $src"
    exit 1
  fi
  # One line per kernel and architecture: name (demangled), registers, stack, spills.
  python3 - "$log" <<'PY' || status=1
import re, subprocess, sys
text = open(sys.argv[1]).read()
entries = re.findall(
    r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
    r".*?Used (\d+) registers", text, re.S)
names = subprocess.run(["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True, text=True).stdout.split("\n")
bad = 0
for (mangled, arch, stack, stores, loads, regs), name in zip(entries, names):
    short = re.sub(r"disalign::cuda::\(anonymous namespace\)::", "", name)
    short = re.sub(r"\(.*\)$", "", short)
    spills = int(stores) + int(loads)
    flag = "  <-- SPILLS" if spills else ""
    bad += spills > 0
    print(f"  {arch} regs={regs:>3} stack={stack:>3}B spill={stores}/{loads}B  {short}{flag}")
print(f"check_cuda: {len(entries)} kernel builds, {bad} with spills")
sys.exit(1 if bad or not entries else 0)
PY
done

# The real build: the extension that install.sh built with DISALIGN_CUDA=1 must hold the CUDA kernels,
# with SASS and PTX for exactly the targets of disalign_ops/_cuda_arch.py (TORCH_CUDA_ARCH_LIST honoured).
so=$("$PYTHON" -c "import disalign_ops._C as c; print(c.__file__)" 2>/dev/null || true)
if [[ -z "$so" ]]; then
  echo "check_cuda: built-library check SKIPPED - disalign_ops._C is not importable (not installed)"
elif ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "check_cuda: built-library check SKIPPED - torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is a CPU-only build"
else
  check_library "$so" || status=1
fi
if [[ $status -ne 0 ]]; then
  echo "check_cuda: FAILED (see above)"
  exit 1
fi
echo "check_cuda: OK"
