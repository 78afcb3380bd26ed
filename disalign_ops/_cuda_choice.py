"""The automatic backend on CUDA as measured on a GPU (backends.measured_backend reads it).

Written by `python benches/backend_choice.py RESULTS.json` from the rows of a GPU benchmark run
(benches/gpu_check.sh, bench_ops.py); not edited by hand. MEASURED holds one row per benchmark case:
its layout ("rows": classes contiguous; "pixels": NCHW), dtype class ("16-bit", "float32",
"float64"), mode ("stage2": logits frozen; "full": logits need a gradient), class count, the
median ms of each GPU backend, and the backend chosen. Empty: no GPU run has been measured, and
backend=None keeps the provisional order (native where built with CUDA, then triton).
"""

SOURCE = None
MEASURED = ()
