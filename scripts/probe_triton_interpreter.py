"""Exit 0 when Triton's interpreter (TRITON_INTERPRET=1) runs a small kernel with a scalar loop, or when
Triton is absent; exit 1, printing the error, when it fails (scripts/check_torch.sh uses this)."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
try:
    import torch
    import triton
    import triton.language as tl
except ImportError:
    sys.exit(0)


@triton.jit
def _strided_fill(out_ptr, n):
    for i in range(tl.program_id(0), n, tl.num_programs(0)):
        tl.store(out_ptr + i, i)


out = torch.zeros(10)
try:
    _strided_fill[(3,)](out, 10)
except Exception as error:  # noqa: BLE001 - any failure means the interpreter is unusable here
    print(f"triton {triton.__version__} interpreter: {error!r}")
    sys.exit(1)
sys.exit(0 if out.tolist() == [float(i) for i in range(10)] else 1)
