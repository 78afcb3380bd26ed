"""Build of disalign_ops: the C++ extension `disalign_ops._C` and the Python packages.

Install on a CPU machine (torch first, then without build isolation so the local torch is used):

    pip install torch==2.13.0
    pip install --no-build-isolation .

CUDA kernels (csrc/cuda) are built when DISALIGN_CUDA=1, or when DISALIGN_CUDA is unset and both a
CUDA toolkit and a CUDA build of torch are present. DISALIGN_CUDA=0 forces a CPU-only build.

The CPU kernel file (csrc/cpu/disalign_kernels.cpp) is compiled once per instruction set, each
copy in its own namespace, exactly as ATen builds its per-ISA kernels; csrc/cpu/dispatch.cpp picks
the best copy the running CPU supports (ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
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
        sources += glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")
        # No --use_fast_math: the kernels pick their fast paths (exp2f, reciprocals) where they are
        # accurate enough; fast-math would also flush denormals and approximate every division.
        nvcc_flags = ["-O3", "-lineinfo"]
        nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
        return CUDAExtension(
            sources=sources,
            define_macros=[("DISALIGN_WITH_CUDA", None)] + gpu_plan_macros(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    name="disalign_ops",
    version="0.1.0",
    description="Fused DisAlign (CVPR 2021) calibration and re-weighted cross entropy for PyTorch",
    packages=find_packages(include=["disalign_ops", "disalign_ops.*"]) + find_packages("python"),
    package_dir={"disalign_train": "python/disalign_train"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildPerIsaExtension},
    python_requires=">=3.10",
    # torch is not listed: a bare `torch` requirement would pull a CUDA build over the local wheel.
    install_requires=["numpy", "tqdm", "matplotlib", "scikit-learn", "pillow", "pycocotools"],
    extras_require={"test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis"], "triton": ["triton"]},
    entry_points={"console_scripts": ["disalign-train=disalign_train.cli:main"]},
)
