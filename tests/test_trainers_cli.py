"""`disalign-train`: one flag vocabulary for the three tasks, lazy imports, errors before work in one line."""

import os
import subprocess
import sys

import pytest

from disalign_train import cli
from disalign_train.core.errors import UserError

SHARED = ["--epochs", "--lr", "--stage2-epochs", "--stage2-lr", "--data", "--data-seed", "--seeds", "--threads",
          "--batch-size", "--out", "--backend", "--device", "--max-steps", "--methods", "--rho", "--group-rule",
          "--paper-recipe", "--debug"]


def _options(task: str) -> set[str]:
    parser = cli.build_parser(task)
    sub = next(a for a in parser._actions if a.dest == "task").choices[task]
    return {flag for action in sub._actions for flag in action.option_strings}


@pytest.mark.parametrize("task", list(cli.TASKS))
def test_every_task_speaks_the_shared_vocabulary_with_defaults_in_help(task, capsys):
    assert set(SHARED) <= _options(task)
    with pytest.raises(SystemExit):
        cli.main([task, "--help"])
    text = capsys.readouterr().out
    assert "(default: " in text and "--stage2-epochs" in text


def test_the_ablations_share_their_names():
    from disalign_train.classification.methods import METHODS as classify
    from disalign_train.detection.methods import METHODS as detect
    from disalign_train.segmentation.methods import METHODS as segment

    for methods in (classify, segment, detect):
        assert {"joint", "grw_only", "disalign"} <= set(methods) and next(iter(methods)) == "joint"
        assert methods["grw_only"].title == classify["grw_only"].title


def test_top_level_help_imports_no_trainer():
    code = ("import sys\nfrom disalign_train import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "loaded = [m for m in sys.modules if m.split('.')[:2][-1] in ('classification', 'segmentation', 'detection')]\n"
            "print(loaded, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[] False"
    assert "classify" in result.stdout and "segment" in result.stdout and "detect" in result.stdout


def test_triton_on_the_cpu_without_the_interpreter_is_refused_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["classify", "--out", str(tmp_path / "out"), "--backend", "triton", "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRITON_INTERPRET=1" in err[0] and err[0].startswith("disalign-train classify: error:")
    assert not (tmp_path / "out").exists()  # nothing started
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        cli.main([*argv, "--debug"])  # --debug: the exception itself, with its traceback


def test_flag_values_are_checked_first(tmp_path, capsys):
    assert cli.main(["segment", "--out", str(tmp_path), "--max-steps", "0"]) == 2
    assert "--max-steps must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["detect", "--out", str(tmp_path), "--lr", "-1"]) == 2
    assert "--lr must be >= 0" in capsys.readouterr().err


def test_backend_is_checked_and_left_automatic_unless_given(tmp_path, monkeypatch):
    """session() checks --backend before work and passes an explicit one on; without one the ops
    choose per call (disalign_ops.backends: on CUDA from the measured timings)."""
    import argparse

    import torch

    from disalign_train.core import runtime

    monkeypatch.delenv("DISALIGN_BACKEND", raising=False)
    for given, passed in ((None, None), ("eager", "eager")):
        args = argparse.Namespace(device="cpu", threads=torch.get_num_threads(), backend=given, out=str(tmp_path / str(given)))
        with runtime.session(args, "classify") as (device, out, logger):
            assert args.backend == passed and device.type == "cpu"
    args = argparse.Namespace(device="cpu", threads=torch.get_num_threads(), backend="nonsense", out=str(tmp_path / "bad"))
    with pytest.raises(UserError, match="nonsense"):
        with runtime.session(args, "classify"):
            pass
