"""Packaging and robustness of the import (issue 8): the pure-Python fallback without the compiled
extension, a backend whose import fails, the backend-selection errors, the CUDA target list of the
build, the torch API shims and the build's refusal to run without torch.

Fallback checks run in a fresh interpreter on a copy of the package in which the extension is
really missing (or replaced by a file that is not a library), so nothing is mocked inside the
code under test."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import disalign_ops
from disalign_ops import _cuda_arch, backends

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(os.path.abspath(disalign_ops.__file__))
SETUP_PY = os.path.join(os.path.dirname(TESTS_DIR), "setup.py")
HAS_TRITON = importlib.util.find_spec("triton") is not None

# The child's checks: eager (and triton where it runs) work, native is absent and says why.
CHILD = r"""
import json, os, sys
import torch
import torch.nn.functional as F
import disalign_ops as da

torch.manual_seed(0)
z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 5, (6,))
a = 0.3 * torch.randn(5, dtype=torch.float64)
b = torch.randn(5, dtype=torch.float64)
loss = da.disalign_cross_entropy(z, y, a, b)
torch.testing.assert_close(loss, F.cross_entropy((1 + a) * z + b, y))
loss.backward()
head = da.nn.DisAlignLinear.from_linear(torch.nn.Linear(4, 5))
head(torch.randn(3, 4))
report = {"file": da.__file__, "has_ops": da._has_ops(), "cpu": da.available_backends("cpu"), "errors": {}}
for name, kwargs in {"argument": {"backend": "native"}, "env": {}}.items():
    os.environ["DISALIGN_BACKEND"] = "native" if name == "env" else ""
    try:
        da.calibrate(z, a, b, **kwargs)
    except RuntimeError as error:
        report["errors"][name] = str(error)
print(json.dumps(report))
"""


# An editable install (`pip install -e`, as CI's main job does) puts a finder on sys.meta_path that
# resolves disalign_ops.* submodules in the source checkout when the copy lacks them (the copy's
# missing _C would be found there): the child drops it, so the copy is all it sees.
ISOLATE = r"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


def _run(code: str, pythonpath: str, env_extra=None) -> dict:
    env = dict(os.environ)
    env.pop("DISALIGN_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, TESTS_DIR])
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", ISOLATE + code], env=env, cwd=pythonpath, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the installed disalign_ops sources without the compiled extension."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "disalign_ops",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return tmp_path


@pytest.mark.parametrize("extension", ["missing", "broken"])
def test_import_works_without_the_extension(package_copy, extension):
    if extension == "broken":  # e.g. a build for another torch: the file is there, loading it fails
        (package_copy / "disalign_ops" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not an ELF")
    report = _run(CHILD, str(package_copy))
    assert report["file"].startswith(str(package_copy))
    assert not report["has_ops"]
    # Everything but native stays as it is in this process (triton too, where it runs).
    assert report["cpu"] == [name for name in disalign_ops.available_backends("cpu") if name != "native"]
    assert report["errors"]["argument"].startswith("backend='native' is not available")
    assert report["errors"]["env"].startswith("the environment variable DISALIGN_BACKEND='native' is not available")
    for message in report["errors"].values():
        assert "disalign_ops._C did not load" in message
        assert ("ModuleNotFoundError" if extension == "missing" else "ImportError") in message
        assert "pip install --no-build-isolation ." in message and "build_ext --inplace" in message


# A backend module whose import fails the way the Triton backend did on torch 2.11 (API drift).
FAILING_TRITON_IMPORT = r"""
import importlib.abc, json, sys

class Fail(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "disalign_ops.triton_backend.ops":
            raise ImportError("cannot import name 'optimization_hint' from 'torch.fx.experimental.symbolic_shapes'")
        return None

sys.meta_path.insert(0, Fail())
import disalign_ops as da
import torch
try:
    da.calibrate(torch.zeros(2, 3), torch.zeros(3), torch.zeros(3), backend="triton")
    error = None
except RuntimeError as e:
    error = str(e)
print(json.dumps({"cpu": da.available_backends("cpu"), "error": error}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed (its import must get as far as the ops)")
def test_a_backend_that_fails_to_import_is_left_out_and_says_why():
    report = _run(FAILING_TRITON_IMPORT, os.path.dirname(PACKAGE_DIR), {"TRITON_INTERPRET": "1"})
    assert report["cpu"] == [name for name in disalign_ops.available_backends("cpu") if name != "triton"]
    assert "disalign_ops.triton_backend failed to import" in report["error"]
    assert "cannot import name 'optimization_hint'" in report["error"]
    assert "install a Triton that matches torch" in report["error"]


def test_missing_triton_says_how_to_install_it():
    report = _run(
        "import sys; sys.modules['triton'] = None\n" + FAILING_TRITON_IMPORT, os.path.dirname(PACKAGE_DIR),
        {"TRITON_INTERPRET": "1"},
    )
    assert "triton" not in report["cpu"]
    assert "Triton is not installed: `pip install triton`" in report["error"]


def test_a_built_extension_loads():
    """An extension file next to the package must load: a broken build (e.g. against another torch)
    must fail the suite, not silently leave only the eager backend."""
    if importlib.util.find_spec("disalign_ops._C") is None:
        pytest.skip("disalign_ops._C is not built here (pure-Python fallback)")
    assert disalign_ops._has_ops(), backends.native_import_error()
    assert "native" in disalign_ops.available_backends("cpu")


def test_bad_backend_names_the_argument_or_the_environment_variable(monkeypatch):
    args = torch.zeros(2, 3), torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"^backend must be None or one of .*got 'bogus'"):
        disalign_ops.calibrate(*args, backend="bogus")
    monkeypatch.setenv("DISALIGN_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"^the environment variable DISALIGN_BACKEND must be unset or one of .*'bogus'"):
        disalign_ops.calibrate(*args)
    # An explicit argument wins over the environment.
    torch.testing.assert_close(disalign_ops.calibrate(*args, backend="eager"), args[0])


def test_unavailable_device_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    args = torch.zeros(2, 3), torch.zeros(3), torch.zeros(3)
    cuda_reason = backends.unavailable_reason("triton", "cuda")
    assert "torch.cuda.is_available() is False" in cuda_reason or "Triton" in cuda_reason
    if "triton" not in disalign_ops.available_backends("cpu") and HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            disalign_ops.calibrate(*args, backend="triton")


# ---- CUDA targets of the build (no nvcc needed) ----

def test_default_cuda_targets_are_sass_80_90_and_ptx_90():
    flags = _cuda_arch.parse_arch_list(None)
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert _cuda_arch.parse_arch_list("  ") == flags
    assert _cuda_arch.embedded_targets(flags) == ({"sm_80", "sm_90"}, {"compute_90"})


@pytest.mark.parametrize(
    "arch_list, sass, ptx",
    [
        ("8.0", {"sm_80"}, set()),
        ("8.6 9.0+PTX", {"sm_86", "sm_90"}, {"compute_90"}),
        ("8.0;9.0a;10.0f+PTX", {"sm_80", "sm_90a", "sm_100f"}, {"compute_100f"}),
        ("9.0;9.0;", {"sm_90"}, set()),
        ("12.0+PTX", {"sm_120"}, {"compute_120"}),
    ],
)
def test_torch_cuda_arch_list_is_honoured(arch_list, sass, ptx):
    flags = _cuda_arch.parse_arch_list(arch_list)
    assert len(flags) == len(set(flags))
    assert _cuda_arch.embedded_targets(flags) == (sass, ptx)
    for flag in flags:  # the virtual arch always matches the real one
        virtual, code = flag.removeprefix("-gencode=arch=compute_").split(",code=")
        assert code in (f"sm_{virtual}", f"compute_{virtual}")


@pytest.mark.parametrize("arch_list", ["Ampere", "8", "sm_80", "8.0+ptx", "8.0;;x", ";"])
def test_bad_torch_cuda_arch_list_names_the_variable(arch_list):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _cuda_arch.parse_arch_list(arch_list)


# ---- torch API shims ----

def test_size_hint_reads_a_symbolic_size_without_a_guard():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from disalign_ops._compat import size_hint

    assert size_hint(7) == 7
    shape_env = ShapeEnv()
    source = ConstantSource("rows")
    rows = shape_env.create_symintnode(shape_env.create_symbol(7, source, dynamic_dim=DimDynamic.DYNAMIC), hint=7,
                                       source=source)
    assert isinstance(rows, torch.SymInt)
    assert size_hint(rows) == 7 and size_hint(2 * rows + 1) == 15
    assert not shape_env.guards


# ---- the build ----

@pytest.mark.skipif(not os.path.isfile(SETUP_PY), reason="needs the source tree's setup.py")
def test_build_without_torch_fails_at_once_saying_what_to_do():
    """What an isolated build (`pip install .` without --no-build-isolation) meets: no torch."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as in pip's isolated build environment
        sys.argv = ["setup.py", "--name"]
        exec(compile(open({SETUP_PY!r}).read(), "setup.py", "exec"), {{"__name__": "__main__", "__file__": {SETUP_PY!r}}})
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(SETUP_PY), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "Install torch first" in done.stderr
    assert "pip install --no-build-isolation ." in done.stderr
