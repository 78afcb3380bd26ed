"""pytest-benchmark suite over the bench_ops.py cases: `pytest benches/ --benchmark-only`.

Times forward+backward of every (shape, mode, backend) with a few rounds each; bench_ops.py is the
full measurement (bandwidth bound, peak memory, JSON). Backends the device cannot run are skipped.
Runs on CUDA when available, else on the CPU shapes.
"""

import pytest
import torch

pytest.importorskip("disalign_ops", reason="disalign_ops is not built/installed")
import bench_ops  # noqa: E402  (needs disalign_ops)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def runnable():
    return bench_ops.runnable_backends(DEVICE)


@pytest.mark.parametrize("backend", bench_ops.BACKENDS)
@pytest.mark.parametrize("mode", bench_ops.MODES)
@pytest.mark.parametrize("shape", list(bench_ops.SHAPES))
def test_forward_backward(benchmark, runnable, shape, mode, backend):
    if backend not in runnable:
        pytest.skip(f"backend {backend!r} is not available on {DEVICE} (available: {runnable})")
    problem = bench_ops.make_problem(shape, mode, DEVICE, torch.float32)
    step = bench_ops.make_step(backend, problem)
    problem.reset_grads()
    step()  # compile / JIT outside the timing

    def synchronized_step():
        step()
        bench_ops.synchronize(DEVICE)

    benchmark.extra_info.update(dims=list(problem.logits.shape), logits_mib=problem.logits_bytes / bench_ops.MIB)
    benchmark.pedantic(synchronized_step, setup=problem.reset_grads, rounds=5, warmup_rounds=1)
