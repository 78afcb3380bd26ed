"""Build of disalign_ops: the C++ extension `disalign_ops._C` and the Python packages.

Install torch first (any release from 2.11 to 2.15, CPU or CUDA build), then build against it
without build isolation (an isolated build cannot see the installed torch):

    pip install torch==2.14.1
    pip install --no-build-isolation .            # or .[train] for the trainers, -e for development

CUDA kernels (csrc/cuda) are built when DISALIGN_CUDA=1, or when DISALIGN_CUDA is unset and both a
CUDA toolkit and a CUDA build of torch are present. DISALIGN_CUDA=0 forces a CPU-only build.
Targets: SASS sm_80 + sm_90 and PTX compute_90, or TORCH_CUDA_ARCH_LIST (disalign_ops/_cuda_arch.py).
When `nvcc` on PATH is a wrapper script, set CUDA_HOME to the toolkit (e.g. /usr/local/cuda); when the
toolkit lacks the CUDA libraries' headers, put pip's (site-packages/nvidia/cu13/include) on CPATH.
scripts/cuda_env.sh does both.

The CPU kernel file (csrc/cpu/disalign_kernels.cpp, with the csrc/cpu/*.h kernels it includes) is
compiled once per instruction set, each copy in its own namespace, exactly as ATen builds its
per-ISA kernels; csrc/cpu/dispatch.cpp picks
the best copy the running CPU supports (ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it).
"""

import glob
import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    sys.exit(
        "disalign_ops builds against the torch already installed, and none is importable here.\n"
        "Install torch first (e.g. `pip install torch==2.14.1`), then build without build isolation, which\n"
        "would hide it: `pip install --no-build-isolation .` (or `pip wheel --no-build-isolation .`)."
    )
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _load_source(name: str, path: str):
    """A torch-free module of the package, loaded by path (importing disalign_ops would need _C)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_arch = _load_source("_disalign_cuda_arch", os.path.join("disalign_ops", "_cuda_arch.py"))
with open(os.path.join(ROOT, "disalign_ops", "__init__.py")) as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
PER_ISA_KERNEL = os.path.join("csrc", "cpu", "disalign_kernels.cpp")

# (namespace, macros, flags): the namespaces match ATen's CPU_CAPABILITY convention.
CPU_CAPABILITIES = [
    ("DEFAULT", [("CPU_CAPABILITY", "DEFAULT"), ("CPU_CAPABILITY_DEFAULT", None)], []),
    ("AVX2", [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)], ["-mavx2", "-mfma", "-mf16c"]),
    (
        "AVX512",
        [("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    ),
]


def gpu_plan_macros():
    """Launch-planning constants shared with the Triton backend, defined once in disalign_ops/_gpu_plan.py
    (loaded from its file: the package itself is not importable while it is being built)."""
    import runpy

    return runpy.run_path(os.path.join(ROOT, "disalign_ops", "_gpu_plan.py"))["compiler_macros"]()


def build_cuda() -> bool:
    choice = os.environ.get("DISALIGN_CUDA")
    if choice is not None:
        return choice == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def check_cuda_toolkit() -> None:
    """Fails at once, saying what to set, where the CUDA build would fail deep inside nvcc or g++."""
    cpu_only = " (or DISALIGN_CUDA=0 for a CPU-only build)"
    if torch.version.cuda is None:
        sys.exit(f"DISALIGN_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} is CPU-only" + cpu_only)
    include = os.path.join(CUDA_HOME or "", "include")
    if CUDA_HOME is None or not os.path.isfile(os.path.join(include, "cuda_runtime_api.h")):
        sys.exit(
            f"DISALIGN_CUDA=1: no CUDA toolkit at CUDA_HOME={CUDA_HOME!r} (no include/cuda_runtime_api.h). "
            "Set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda (torch guesses it from `which nvcc`, "
            "wrong when nvcc is a wrapper script)" + cpu_only
        )
    search = [include] + [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    if not any(os.path.isfile(os.path.join(d, "cublas_v2.h")) for d in search):
        sys.exit(
            f"DISALIGN_CUDA=1: torch's CUDA headers include cublas_v2.h, found neither in {include} nor on CPATH. "
            "Put the CUDA libraries' headers on CPATH, e.g. those pip installed with torch: "
            "CPATH=<site-packages>/nvidia/cu13/include (scripts/cuda_env.sh finds them)" + cpu_only
        )


class BuildPerIsaExtension(BuildExtension):
    """BuildExtension that also compiles the CPU kernel file once per ISA and links all copies."""

    def build_extension(self, ext):
        base_args = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        for name, macros, flags in CPU_CAPABILITIES:
            objects = self.compiler.compile(
                [PER_ISA_KERNEL],
                output_dir=os.path.join(self.build_temp, "isa_" + name.lower()),
                macros=ext.define_macros + macros,
                include_dirs=ext.include_dirs,
                extra_postargs=list(base_args) + flags,
                depends=ext.depends,
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def extension():
    cxx_flags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]  # no -std: torch picks the standard its headers need
    # Compiled once in every build: the schemas (csrc/disalign.cpp), the binding code shared by the
    # CPU and CUDA registrations (csrc/common) and the CPU registration (csrc/cpu/dispatch.cpp).
    sources = [s for s in glob.glob("csrc/**/*.cpp", recursive=True) if s != PER_ISA_KERNEL]
    sources = [s for s in sources if not s.startswith(os.path.join("csrc", "cuda"))]
    common = dict(
        name="disalign_ops._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)
        + [os.path.join("disalign_ops", "_gpu_plan.py")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if build_cuda():
        check_cuda_toolkit()
        sources += glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")
        # No --use_fast_math: the kernels pick their fast paths (exp2f, reciprocals) where they are
        # accurate enough; fast-math would also flush denormals and approximate every division.
        # Explicit -gencode flags: torch's BuildExtension then adds none of its own.
        nvcc_flags = ["-O3", "-lineinfo"] + cuda_arch.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return CUDAExtension(
            sources=sources,
            define_macros=[("DISALIGN_WITH_CUDA", None)] + gpu_plan_macros(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    name="disalign_ops",
    version=VERSION,
    description="Fused DisAlign (CVPR 2021) calibration and re-weighted cross entropy for PyTorch",
    packages=find_packages(include=["disalign_ops", "disalign_ops.*"]) + find_packages("python"),
    package_dir={"disalign_train": "python/disalign_train"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildPerIsaExtension},
    python_requires=">=3.10",
    # torch is not listed: the user installs it first (the build links against that very torch), and a
    # bare `torch` requirement would let pip replace it, e.g. a CPU wheel by a CUDA build.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis"],
        "triton": ["triton"],
        # The trainers (python/disalign_train) only.
        "train": ["tqdm", "matplotlib", "scikit-learn", "pillow", "pycocotools", "torchvision"],
    },
    entry_points={"console_scripts": ["disalign-train=disalign_train.cli:main"]},
)
