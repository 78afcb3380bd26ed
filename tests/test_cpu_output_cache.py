"""The native CPU ops' reused output blocks (csrc/cpu/output_cache.h, disalign_ops.empty_cache):
a freed grad_logits or calibrated-logits block serves the next output of its size, the results stay
exact on reused memory, at most two blocks stay idle, DISALIGN_CPU_OUTPUT_CACHE=0 turns reuse off,
and the profiler still sees every output."""

import json
import threading

import pytest
import torch

import disalign_ops
from disalign_ops import reference

pytestmark = pytest.mark.skipif(
    "native" not in disalign_ops.available_backends("cpu"), reason="the native CPU kernels are not built"
)

MIB = 1 << 20
BLOCK = 2 * MIB  # blocks are multiples of 2 MiB


def _block_bytes(nbytes):
    return -(-nbytes // BLOCK) * BLOCK


@pytest.fixture(autouse=True)
def empty_cache_around(monkeypatch):
    monkeypatch.delenv("DISALIGN_CPU_OUTPUT_CACHE", raising=False)
    disalign_ops.empty_cache()
    yield
    disalign_ops.empty_cache()


def _params(classes, requires_grad=False):
    g = torch.Generator().manual_seed(classes)
    alpha = (0.3 * torch.randn(classes, generator=g)).requires_grad_(requires_grad)
    beta = (0.3 * torch.randn(classes, generator=g)).requires_grad_(requires_grad)
    return alpha, beta


def _full_mode_grad(logits, target, alpha, beta):
    z = logits.clone().requires_grad_()
    disalign_ops.disalign_cross_entropy(z, target, alpha, beta, backend="native").backward()
    return z.grad


def test_a_freed_grad_logits_block_serves_the_next_step_and_the_gradient_stays_exact():
    rows, classes = 600, 1000  # 2.4 MB of float32 logits
    alpha, beta = _params(classes)
    target = torch.randint(0, classes, (rows,))
    first = _full_mode_grad(torch.randn(rows, classes), target, alpha, beta)
    address = first.data_ptr()
    del first  # back to the cache, holding that step's gradient
    logits = 5 * torch.randn(rows, classes)
    second = _full_mode_grad(logits, target, alpha, beta)
    assert second.data_ptr() == address
    z = logits.clone().requires_grad_()
    reference.cross_entropy(z, target, alpha, beta, None, None, -100, "mean").backward()
    torch.testing.assert_close(second, z.grad, rtol=1e-5, atol=1e-7)


def test_calibrated_logits_reuse_a_block_and_stay_exact():
    logits = torch.randn(2, 64, 48, 48)  # NCHW, 1.2 MB
    alpha, beta = _params(64)
    out = disalign_ops.calibrate(logits, alpha, beta, backend="native")
    address = out.data_ptr()
    del out
    out = disalign_ops.calibrate(2 * logits, alpha, beta, backend="native")
    assert out.data_ptr() == address
    assert out.stride() == logits.stride()
    torch.testing.assert_close(out, reference.calibrate(2 * logits, alpha, beta, None))


def test_empty_cache_returns_the_idle_bytes_and_small_outputs_are_not_kept():
    alpha, beta = _params(100)
    small = disalign_ops.calibrate(torch.randn(100, 100), alpha, beta, backend="native")  # 40 kB
    del small
    assert disalign_ops.empty_cache() == 0
    big = disalign_ops.calibrate(torch.randn(3000, 100), alpha, beta, backend="native")  # 1.2 MB
    nbytes = big.nbytes
    del big
    assert disalign_ops.empty_cache() == _block_bytes(nbytes)
    assert disalign_ops.empty_cache() == 0


def test_at_most_two_blocks_stay_idle():
    alpha, beta = _params(100)
    sizes = []
    for rows in (3000, 6000, 12000, 24000, 48000):  # each twice the last: no block fits the next
        out = disalign_ops.calibrate(torch.randn(rows, 100), alpha, beta, backend="native")
        sizes.append(_block_bytes(out.nbytes))
        del out
    assert disalign_ops.empty_cache() == sizes[-1] + sizes[-2]


def test_a_block_with_more_than_an_eighth_to_spare_is_not_reused():
    alpha, beta = _params(100)
    out = disalign_ops.calibrate(torch.randn(45000, 100), alpha, beta, backend="native")  # an 18 MiB block
    address = out.data_ptr()
    del out
    smaller = disalign_ops.calibrate(torch.randn(35000, 100), alpha, beta, backend="native")  # 13.4 MiB: 14 MiB
    assert smaller.data_ptr() != address
    del smaller
    assert disalign_ops.empty_cache() == 18 * MIB + 14 * MIB


def test_the_env_var_turns_reuse_off(monkeypatch):
    monkeypatch.setenv("DISALIGN_CPU_OUTPUT_CACHE", "0")
    rows, classes = 600, 1000
    alpha, beta = _params(classes)
    target = torch.randint(0, classes, (rows,))
    logits = torch.randn(rows, classes)
    grad = _full_mode_grad(logits, target, alpha, beta)
    del grad
    assert disalign_ops.empty_cache() == 0
    monkeypatch.setenv("DISALIGN_CPU_OUTPUT_CACHE", "1")
    grad = _full_mode_grad(logits, target, alpha, beta)
    del grad
    assert disalign_ops.empty_cache() == _block_bytes(rows * classes * 4)


def test_a_reused_output_can_be_resized_and_keeps_its_values():
    alpha, beta = _params(100)
    logits = torch.randn(3000, 100)
    out = disalign_ops.calibrate(logits, alpha, beta, backend="native")
    expected = out.clone()
    out.resize_(6000, 100)
    torch.testing.assert_close(out[:3000], expected)


def test_the_profiler_sees_the_outputs_memory():
    from torch.profiler import ProfilerActivity, profile

    alpha, beta = _params(100)
    logits = torch.randn(3000, 100)
    warm = disalign_ops.calibrate(logits, alpha, beta, backend="native")
    del warm  # the next call takes this idle block: it must still be reported as allocated
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = disalign_ops.calibrate(logits, alpha, beta, backend="native")
    usage = sum(e.cpu_memory_usage for e in prof.key_averages() if e.key == "disalign::calibrate")
    assert usage >= out.nbytes


def test_outputs_made_and_freed_on_several_threads_are_exact():
    alpha, beta = _params(100)
    inputs = [torch.randn(3000 + 7 * i, 100) for i in range(4)]
    errors = []

    def work(logits):
        try:
            for _ in range(20):
                out = disalign_ops.calibrate(logits, alpha, beta, backend="native")
                torch.testing.assert_close(out, reference.calibrate(logits, alpha, beta, None))
        except Exception as e:  # reported below: an assert in a thread does not fail the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _memory_events(prof, tmp_path):
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]


def test_the_profiler_counts_a_reused_larger_block_alike_when_handed_out_and_given_back(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    alpha, beta = _params(100)
    larger = disalign_ops.calibrate(torch.randn(45000, 100), alpha, beta, backend="native")  # an 18 MiB block
    address = larger.data_ptr()
    del larger
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = disalign_ops.calibrate(torch.randn(40000, 100), alpha, beta, backend="native")  # 15.3 MiB: takes it
        assert out.data_ptr() == address
        del out
    ours = [e for e in _memory_events(prof, tmp_path) if e["Addr"] == address]
    assert [e["Bytes"] for e in ours] == [18 * MIB, -18 * MIB]
    assert all(0 <= e["Total Allocated"] <= 18 * MIB for e in ours)


def test_turning_reuse_off_frees_each_output_it_gets_back(monkeypatch):
    alpha, beta = _params(100)
    kept = disalign_ops.calibrate(torch.randn(3000, 100), alpha, beta, backend="native")
    del kept  # idle while reuse is on
    monkeypatch.setenv("DISALIGN_CPU_OUTPUT_CACHE", "0")
    out = disalign_ops.calibrate(torch.randn(6000, 100), alpha, beta, backend="native")
    monkeypatch.setenv("DISALIGN_CPU_OUTPUT_CACHE", "1")
    out2 = disalign_ops.calibrate(torch.randn(12000, 100), alpha, beta, backend="native")  # cached block
    monkeypatch.setenv("DISALIGN_CPU_OUTPUT_CACHE", "0")
    del out, out2  # out came from malloc; out2's block is freed at once, the earlier idle one stays
    assert disalign_ops.empty_cache() == _block_bytes(3000 * 100 * 4)
