"""Backend registry and the automatic choice.

"eager"  : disalign_ops.reference, plain PyTorch autograd (always available).
"native" : torch.ops.disalign, the compiled C++ extension (CPU kernels; CUDA kernels when built with CUDA).
"triton" : torch.ops.disalign_triton, the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

backend=None picks, in order: the DISALIGN_BACKEND environment variable, then on CUDA the backend
measured faster on the nearest benchmark case (`measured_backend`, from `_cuda_choice.py`, which
benches/backend_choice.py writes from a GPU run; empty until one is measured), then "native" where
it has a kernel for the device, then "triton", then "eager".

A backend that cannot load (the extension missing, built for another torch, Triton absent or
incompatible) is left out of `available_backends`; it never disables the others. Asking for it by
name raises a RuntimeError carrying the import error and what to do about it (`unavailable_reason`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os

import torch

from . import _cuda_choice

BACKENDS = ("eager", "native", "triton")
ENV_VAR = "DISALIGN_BACKEND"

_BUILD_HINT = (
    "build it against the installed torch: `pip install --no-build-isolation .` (or, in a source checkout, "
    "`python setup.py build_ext --inplace`); a torch upgrade needs a rebuild"
)


@functools.lru_cache(maxsize=None)
def _load(module: str) -> Exception | None:
    """Imports disalign_ops.<module> once; the exception that stopped it, or None.

    Anything the import raises is kept, not only ImportError: a torch API that moved (AttributeError)
    or an operator registration that a torch release rejects (RuntimeError) must leave the other
    backends usable too."""
    try:
        importlib.import_module(f"{__package__}.{module}")
    except Exception as error:  # noqa: BLE001  (reported verbatim by unavailable_reason)
        return error
    return None


def native_import_error() -> Exception | None:
    """Why the compiled extension `disalign_ops._C` did not load (None when it loaded)."""
    return _load("_C")


def has_native_ops() -> bool:
    """Whether `torch.ops.disalign` is registered (the extension loaded), like torchvision's _has_ops()."""
    return native_import_error() is None


@functools.lru_cache(maxsize=None)
def _native_has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        has_native_ops()
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key("disalign::cross_entropy", key)
    )


def _triton_available(device_type: str) -> bool:
    if _load("triton_backend") is not None:
        return False
    from . import triton_backend

    return triton_backend.is_available(device_type)


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on `device` (a torch.device, or a string such as "cpu", "cuda:0")."""
    device_type = torch.device(device).type
    names = ["eager"]
    if _native_has_kernel(device_type):
        names.append("native")
    if _triton_available(device_type):
        names.append("triton")
    return names


def unavailable_reason(backend: str, device_type: str) -> str:
    """Why `backend` cannot run on `device_type`, and how to fix it (for a backend not available there)."""
    if backend == "native":
        error = native_import_error()
        if error is not None:
            return (f"the compiled extension disalign_ops._C did not load ({type(error).__name__}: {error}); "
                    f"{_BUILD_HINT}")
        if device_type == "cuda":
            return ("the extension was built without its CUDA kernels; rebuild with DISALIGN_CUDA=1 on a machine "
                    "with nvcc and a CUDA build of torch (CUDA_HOME pointing at the toolkit)")
        return f"the extension has no kernels for {device_type!r} tensors (it has CPU and, if built so, CUDA kernels)"
    if backend == "triton":
        error = _load("triton_backend")
        if error is not None:
            return (f"disalign_ops.triton_backend failed to import ({type(error).__name__}: {error}); "
                    f"install a Triton that matches torch {torch.__version__} (the one torch depends on)")
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed: `pip install triton` (or `pip install disalign_ops[triton]`)"
        if device_type == "cpu":
            return ("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the environment "
                    "before disalign_ops is first imported")
        if device_type == "cuda":
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return f"Triton has no support for {device_type!r} tensors"
    return f"{backend!r} runs on every device"


def dtype_class(dtype: torch.dtype) -> str:
    return "16-bit" if dtype in (torch.float16, torch.bfloat16) else str(dtype).removeprefix("torch.")


def case_key(logits: torch.Tensor) -> tuple[str, str, str, int]:
    """(layout, dtype class, mode, classes) of cross-entropy logits, as benches/backend_choice.py
    keys its measurements: "rows" where the classes are contiguous ((N, C), channels-last), else
    "pixels" (NCHW); "full" where the logits need a gradient, else "stage2"."""
    layout = "rows" if logits.stride(1) == 1 or logits.size(1) == 1 else "pixels"
    mode = "full" if logits.requires_grad else "stage2"
    return layout, dtype_class(logits.dtype), mode, int(logits.size(1))


def measured_case(logits: torch.Tensor) -> tuple[str, str, str, int] | None:
    """case_key of a call for `measured_backend`; None where nothing measured can match (no table,
    not CUDA), so that no shape is looked at then (nor guarded on under torch.compile)."""
    if not _cuda_choice.MEASURED or logits.device.type != "cuda" or logits.dim() < 2:
        return None
    return case_key(logits)


def measured_backend(case: tuple[str, str, str, int] | None) -> str | None:
    """The backend measured faster on the benchmark case nearest to `case`: same layout, dtype class
    and mode, the nearest class count on a log scale (ties: the smaller count); None without one."""
    if case is None:
        return None
    layout, dtype, mode, classes = case
    rows = [r for r in _cuda_choice.MEASURED if (r["layout"], r["dtype"], r["mode"]) == (layout, dtype, mode)]
    if not rows:
        return None
    nearest = min(rows, key=lambda r: (abs(math.log(r["classes"]) - math.log(max(classes, 1))), r["classes"]))
    return nearest["backend"]


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device, case: tuple | None = None) -> str:
    """The backend to run on `device`: the requested one (validated) or the automatic choice.

    case: `measured_case` of the call, for the measured choice on CUDA (None: the order alone).
    torch.compile evaluates it once while tracing and keeps the answer as a constant (its inputs
    are constants of the graph; the dispatcher query inside it cannot be traced).
    """
    source = "backend"
    requested = backend
    if backend is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"the environment variable {ENV_VAR}"
    if requested is not None and requested not in BACKENDS:
        allowed = f"unset or one of {BACKENDS}" if backend is None else f"None or one of {BACKENDS}"
        raise ValueError(f"{source} must be {allowed}, got {requested!r}")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if requested is None and device_type == "cuda":
        measured = measured_backend(case)
        if measured is not None and measured in available_backends(device):
            return measured
    if requested in (None, "native") and _native_has_kernel(device_type):
        return "native"  # the common case, without asking Triton (it comes after native in the automatic order)
    available = available_backends(device)
    if requested is None:
        for name in ("native", "triton", "eager"):
            if name in available:
                return name
    if requested not in available:
        raise RuntimeError(
            f"{source}={requested!r} is not available for device {device}: "
            f"{unavailable_reason(requested, device_type)}. Available: {available}"
        )
    return requested
