"""Tests of the benchmark scripts themselves, plus the pytest-benchmark suite over the bench_ops.py cases.

The script tests run in a plain `pytest benches/` on the CPU: bench_ops.py on tiny shapes (--quick) and
its JSON schema, the SPEC target checks, gpu_check.sh's step runner on a machine without CUDA, the
gpu_check summary and ncu parsing, and the Liger-Kernel wheel that travels to the GPU machine.
`pytest benches/ --benchmark-only` times forward+backward of every (shape, mode, backend) with a few
rounds each (CUDA when available, else the CPU shapes); bench_ops.py is the full measurement.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("disalign_ops", reason="disalign_ops is not built/installed")
import bench_ops  # noqa: E402  (needs disalign_ops)
import gpu_check  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_quick_run_writes_one_row_per_case_with_the_schema(tmp_path):
    path = tmp_path / "quick.json"
    backends = ["eager", "native", "liger"]  # liger cannot run on the CPU: it must be left out, not fail
    bench_ops.main(["--device", "cpu", "--quick", "--shapes", "seg-ade,det-lvis", "--modes", "stage2,full",
                    "--dtype", "float32,bfloat16", "--backends", ",".join(backends), "--repeat", "2", "--warmup", "0",
                    "--copy-mib", "8", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["complete"] and report["quick"]
    assert (tmp_path / "quick.md").read_text().count("| seg-ade |") >= 8
    rows = report["rows"]
    keys = [(r["shape"], r["mode"], r["dtype"], r["backend"]) for r in rows]
    expected = [(s, m, d, b) for d in ("float32", "bfloat16") for s in ("seg-ade", "det-lvis") for m in bench_ops.MODES
                for b in ("eager", "native")]
    assert keys == expected
    for r in rows:
        assert set(bench_ops.ROW_KEYS) <= r.keys(), r
        assert r.get("error") is None, r
        assert r["device"] == report["device"]["device_name"]
        assert r["dims"][1] == bench_ops.SHAPES[r["shape"]].cpu_dims[1]  # quick shapes keep the class count
        assert r["ms"] > 0 and r["fraction_of_copy_bandwidth"] > 0
        assert r["fraction_of_copy_bandwidth"] == pytest.approx(1 / r["bound_ratio"])
        assert r["x_compile"] is None  # compile was not run
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 0
        assert r["loss_reference"] == "eager" and r["loss_rel_err"] < 2e-2
        if r["backend"] == "eager":
            assert r["x_eager"] == 1.0
        if r["mode"] == "full":  # gradient of the logits: at least the logits' size
            assert r["peak_extra_bytes"] >= r["logits_mib"] * bench_ops.MIB
    native = {(r["shape"], r["mode"], r["dtype"]): r for r in rows if r["backend"] == "native"}
    assert native[("seg-ade", "stage2", "float32")]["min_bytes_moved"] * 2 == native[("seg-ade", "full", "float32")][
        "min_bytes_moved"]
    assert native[("seg-ade", "stage2", "bfloat16")]["logits_mib"] * 2 == native[("seg-ade", "stage2", "float32")][
        "logits_mib"]


def test_compile_backend_gives_x_compile(tmp_path):
    path = tmp_path / "compile.json"
    bench_ops.main(["--device", "cpu", "--quick", "--shapes", "cls-imagenet", "--modes", "stage2", "--backends",
                    "eager,compile", "--repeat", "1", "--warmup", "0", "--copy-mib", "8", "--json", str(path)])
    rows = {r["backend"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["compile"]["x_compile"] == 1.0
    assert rows["eager"]["x_compile"] == pytest.approx(rows["compile"]["ms"] / rows["eager"]["ms"])
    assert rows["compile"]["first_call_s"] > 0


def _row(backend, shape, mode, **values):
    row = dict.fromkeys(bench_ops.ROW_KEYS)
    row.update(backend=backend, shape=shape, mode=mode, dtype="bfloat16", **values)
    return row


class _FakeLigerFunction(torch.autograd.Function):
    """What Liger's cross entropy does to its input: the gradient is computed in the forward and
    written over the input, which backward then returns (scaled by the upstream gradient)."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index):
        with torch.enable_grad():
            leaf = x.detach().float().requires_grad_()
            loss = torch.nn.functional.cross_entropy(leaf, target, weight=weight, ignore_index=ignore_index)
            grad, = torch.autograd.grad(loss, leaf)
        if x.requires_grad:
            x.copy_(grad)
        ctx.save_for_backward(x)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        return x * grad_output, None, None, None


class _FakeLigerCrossEntropyLoss(torch.nn.Module):
    def __init__(self, weight=None, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.weight, self.ignore_index = weight, ignore_index

    def forward(self, x, target):
        assert x.dim() == 2 and x.stride(-1) == 1, "Liger takes class-contiguous (N, C) rows"
        return _FakeLigerFunction.apply(x, target, self.weight, self.ignore_index)


@pytest.mark.parametrize("shape", ["seg-ade", "det-lvis"])
def test_liger_step_restores_its_input_and_checks_its_loss(shape, monkeypatch):
    """liger_peer's handling of Liger's in-place gradient, with a stand-in that behaves the same way."""
    import types

    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerCrossEntropyLoss = _FakeLigerCrossEntropyLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    problem = bench_ops.make_problem(shape, "full", torch.device("cpu"), torch.float32, quick=True)
    original = problem.logits.detach().clone()
    step = bench_ops.make_step("liger", problem)
    losses = []
    for _ in range(3):
        step.setup()
        losses.append(step())
    assert torch.equal(problem.logits.detach(), original)  # the benchmark's logits are never written
    torch.testing.assert_close(losses[0], step.expected_loss.to(losses[0].dtype))
    assert losses[0] == losses[1] == losses[2]  # each call sees the logits again, not the last gradient
    assert ("permuted" in step.note) == (shape == "seg-ade")
    stage2 = bench_ops.make_step("liger", bench_ops.make_problem(shape, "stage2", torch.device("cpu"), torch.float32,
                                                                 quick=True))
    assert stage2.setup is None
    torch.testing.assert_close(stage2(), stage2.expected_loss)


def test_cuda_targets_follow_the_spec():
    rows = [
        _row("native", "seg-ade", "stage2", fraction_of_copy_bandwidth=0.85, bound_ratio=1 / 0.85, x_eager=20.0,
             x_compile=2.5, peak_extra_pct_of_logits=0.5),
        _row("triton", "cls-imagenet", "full", fraction_of_copy_bandwidth=0.5, bound_ratio=2.0, x_eager=14.0,
             x_compile=3.0, peak_extra_pct_of_logits=105.0),
        _row("liger", "seg-ade", "stage2", fraction_of_copy_bandwidth=0.1, x_eager=1.0),  # a peer: never checked
    ]
    checks = {(c["backend"], c["level"], c["target"]): c["met"] for c in bench_ops.check_targets(rows, "cuda")}
    assert checks == {
        ("native", "target", "fraction of copy bw >= 0.8"): True,
        ("native", "target", "x eager >= 15"): True,
        ("native", "target", "x compile >= 3"): False,
        ("native", "target", "% of logits < 1"): True,
        ("native", "minimum", "x bound <= 1.25"): True,
        ("native", "minimum", "x eager >= 10"): True,
        ("native", "minimum", "x compile >= 2"): True,
        ("native", "minimum", "% of logits < 5"): True,
        # cls-imagenet has no bandwidth target; full mode has no stage-2 memory target
        ("triton", "target", "x eager >= 15"): False,
        ("triton", "target", "x compile >= 3"): True,
        ("triton", "target", "% of logits < 110"): True,
        ("triton", "minimum", "x eager >= 10"): True,
        ("triton", "minimum", "x compile >= 2"): True,
    }
    cpu = {(c["backend"], c["target"]): c["met"] for c in bench_ops.check_targets(rows, "cpu")}
    assert cpu == {("native", "x eager >= 5"): True, ("native", "x compile >= 2"): True,
                   ("native", "% of logits < 10"): True}  # the CPU targets: native only, seg-ade and det-lvis


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","gpu__time_duration.sum","smsp__inst_executed.sum"
"","","","","","","","","","","","byte","nsecond","inst"
"0","123","python3","host","disalign_loss_kernel<__nv_bfloat16>(Params)","1","7","(256, 1, 1)","(264, 1, 1)","0","9.0","629,145,600","180,512","38,000,000"
"1","123","python3","host","triton_stage2_kernel","1","7","(128, 1, 1)","(132, 1, 1)","0","9.0","630,000,000","200,000","41,000,000"
'''


def test_ncu_csv_and_summary(tmp_path):
    ncu = tmp_path / "gpu_check-ncu.csv"
    ncu.write_text(NCU_CSV)
    kernels = gpu_check.ncu_kernels(str(ncu))
    assert [k["id"] for k in kernels] == [0, 1]
    assert kernels[0]["dram__bytes_read.sum"] == 629145600.0 and kernels[1]["gpu__time_duration.sum"] == 200000.0

    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir(), results.mkdir()
    (work / "steps.tsv").write_text("env\tok\t0\t3\t30\t\ntests\tfailed\t1\t50\t110\texit 1\nracecheck\tskipped\t3\t1\t45"
                                    "\tunavailable: tool refused the device\n")
    (work / "tests.log").write_text("....F\n= 1 failed, 4 passed in 3.2s =\n")
    env = {"cuda_available": True, "gpus": [{"name": "NVIDIA H200"}], "torch": "2.11.0+cu130"}
    (work / "env.json").write_text(json.dumps(env))
    rows = [_row("native", "seg-ade", "stage2", ms=1.0, fraction_of_copy_bandwidth=0.9, bound_ratio=1 / 0.9,
                 x_eager=30.0, x_compile=5.0, peak_extra_pct_of_logits=0.2)]
    (results / "nvidia-h200.json").write_text(json.dumps({"device": {"device_type": "cuda"}, "rows": rows,
                                                           "complete": False, "copy_bandwidth_gbps": 4300.0}))
    gpu_check.main(["summary", "--steps", str(work / "steps.tsv"), "--env", str(work / "env.json"), "--work", str(work),
                    "--results", str(results), "--ncu", str(ncu)])
    text = (results / "gpu_check-summary.md").read_text()
    assert "PARTIAL" in text and "SPEC targets met: 4 of 4" in text and "SPEC minimums met: 4 of 4" in text
    assert "| tests | failed | 50 | 110 | 1 failed, 4 passed in 3.2s; exit 1 |" in text
    assert "steps not ok: tests" in text and "disalign_loss_kernel" in text
    summary = json.loads((results / "gpu_check-summary.json").read_text())
    assert summary["bench_json"] == "nvidia-h200.json" and len(summary["ncu"]) == 2


PLUGIN_CASES = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_ok():
    pass

def test_wrong():
    assert 1 + 1 == 3, "arithmetic"

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

def test_setup_error(broken):
    pass
"""


def test_outcomes_plugin_records_each_test_as_it_finishes(tmp_path):
    (tmp_path / "test_cases.py").write_text(PLUGIN_CASES)
    record = tmp_path / "outcomes.jsonl"
    env = dict(os.environ, GPU_CHECK_OUTCOMES=str(record), PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_outcomes",
                          str(tmp_path / "test_cases.py")], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    found = {o["id"].split("::")[1]: o for o in gpu_check.pytest_outcomes.read(str(record))}
    assert {k: v["outcome"] for k, v in found.items()} == {
        "test_ok": "passed", "test_wrong": "failed", "test_skipped": "skipped", "test_setup_error": "error"}
    assert "arithmetic" in found["test_wrong"]["message"] and "fixture broke" in found["test_setup_error"]["message"]
    assert "not here" in found["test_skipped"]["message"] and found["test_ok"]["message"] == ""


def test_summary_of_a_stopped_tests_step_counts_what_finished(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir(), results.mkdir()
    (work / "steps.tsv").write_text("tests\ttimeout\t124\t110\t110\thit its 110 s limit\n")
    (work / "tests.log").write_text("..F.s..\n")  # killed: no closing line
    outcomes = [dict(id=f"tests/test_a.py::test_{i}", outcome="passed", when="call", message="") for i in range(5)]
    outcomes += [dict(id="tests/test_a.py::test_bad[cuda]", outcome="failed", when="call", message="AssertionError: off"),
                 dict(id="tests/test_a.py::test_skip", outcome="skipped", when="setup", message="Skipped: no")]
    (work / "tests-outcomes.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outcomes) + '{"id": "cut')
    (work / "env.json").write_text(json.dumps({"cuda_available": True, "gpus": [{"name": "NVIDIA H200"}]}))
    gpu_check.main(["summary", "--steps", str(work / "steps.tsv"), "--env", str(work / "env.json"), "--work", str(work),
                    "--outcomes", str(work / "tests-outcomes.jsonl"), "--results", str(results)])
    text = (results / "gpu_check-summary.md").read_text()
    assert "stopped after 7 tests: 1 failed, 5 passed, 1 skipped; hit its 110 s limit" in text
    assert "## Failed tests (1)" in text and "- failed: `tests/test_a.py::test_bad[cuda]`: AssertionError: off" in text
    summary = json.loads((results / "gpu_check-summary.json").read_text())
    assert [o["id"] for o in summary["failed_tests"]] == ["tests/test_a.py::test_bad[cuda]"]


def test_sanitizer_cases_keep_their_layouts_and_match_the_reference(capsys):
    """The program compute-sanitizer runs, here on the CPU with the native backend."""
    assert gpu_check.main(["cases", "--device", "cpu", "--layouts", "nc_misaligned,nchw_channels_last"]) == 0
    out = capsys.readouterr().out
    assert "strides (153, 1) offset 1 bf16 stage2 native: ok" in out  # the odd offset survives the move
    assert "strides (5285, 1, 1057, 151) offset 0 bf16 full native: ok" in out
    assert out.count("native: ok") == 4 and "MISMATCH" not in out and "cases: 0 mismatching" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the runner on a machine without CUDA")
def test_gpu_check_without_cuda_skips_the_gpu_steps(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STEPS="env,tests,bench,ncu,multigpu", TMPDIR=str(tmp_path))
    out = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(tmp_path / "results")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA device: GPU steps skipped" in out.stdout
    summary = json.loads((tmp_path / "results" / "gpu_check-summary.json").read_text())
    assert summary["no_cuda"] is True
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("env", "ok"), ("tests", "skipped"), ("bench", "skipped"), ("ncu", "skipped"), ("multigpu", "skipped")]
    assert len(os.listdir(tmp_path / "results")) <= 8  # what the device tool brings back


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench step would run the whole benchmark")
def test_gpu_check_records_a_timed_out_step_and_goes_on(tmp_path):
    # build runs without a GPU when named; its 2 s budget kills it; the steps after it still run
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STEPS="env,build,bench,nosuch", TMPDIR=str(tmp_path),
               GPU_CHECK_STEP_BUDGETS="build=2")
    out = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(tmp_path / "results")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "unknown step nosuch" in out.stdout
    summary = json.loads((tmp_path / "results" / "gpu_check-summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["build"]["status"] == "timeout" and steps["build"]["seconds"] <= 10
    assert steps["bench"]["status"] == "skipped" and steps["bench"]["note"] == "no CUDA device"
    assert "build" in (tmp_path / "results" / "gpu_check-summary.md").read_text().split("steps not ok:")[1]


def test_liger_wheel_installs_offline_and_imports(tmp_path):
    wheels = glob.glob(os.path.join(HERE, "wheels", "liger_kernel-*.whl"))
    assert len(wheels) == 1, wheels
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no pip in this interpreter")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                    str(site), wheels[0]], check=True, timeout=300)
    probe = ("import inspect; from liger_kernel.transformers import LigerCrossEntropyLoss; "
             "print(sorted(inspect.signature(LigerCrossEntropyLoss).parameters))")
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert {"weight", "ignore_index", "reduction"} <= set(eval(out.stdout.strip().splitlines()[-1]))


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

    def setup():
        problem.reset_grads()
        if getattr(step, "setup", None):
            step.setup()

    setup()
    step()  # compile / JIT outside the timing

    def synchronized_step():
        step()
        bench_ops.synchronize(DEVICE)

    benchmark.extra_info.update(dims=list(problem.logits.shape), logits_mib=problem.logits_bytes / bench_ops.MIB)
    benchmark.pedantic(synchronized_step, setup=setup, rounds=5, warmup_rounds=1)
