"""disalign_ops: fused DisAlign (CVPR 2021) calibration and re-weighted cross entropy for PyTorch.

Importing the package loads the compiled extension (registering ``torch.ops.disalign``) and
registers the native ops' fake kernels and autograd; the Triton ops register themselves when
``disalign_ops.triton_backend`` is imported (on first use, where Triton can run).

Without a loadable extension (a source checkout never built, or built against another torch) the
package still imports: the "eager" backend, and "triton" where it runs, stay available; ``_has_ops()``
is False and ``backend="native"`` raises an error saying why the extension did not load and how to
build it (see ``disalign_ops.backends``).
"""

import torch  # noqa: F401  (libc10/libtorch must be loaded before the extension)

from ._registration import register_autograd, register_fake_kernels
from ._validation import InputTypeError
from .api import calibrate, disalign_cross_entropy, empty_cache, op_family
from .backends import available_backends
from .backends import has_native_ops as _has_ops
from .reweight import generalized_reweight

if _has_ops():  # loads disalign_ops._C (the torch.ops.disalign schemas and native kernels) once
    register_fake_kernels(op_family("native"))
    register_autograd(op_family("native"), own_kernel=True)

from . import nn  # noqa: E402  (the heads use the functional API above)

__all__ = [
    "disalign_cross_entropy", "calibrate", "generalized_reweight", "available_backends", "empty_cache", "InputTypeError",
    "nn",
]
__version__ = "0.1.0"
