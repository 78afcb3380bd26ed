"""pytest plugin of gpu_check.sh's tests step: every test's outcome, appended to a file as it finishes.

    GPU_CHECK_OUTCOMES=FILE pytest -p pytest_outcomes ...      (benches/ on sys.path)

One JSON object per line: {"id", "outcome" (passed / failed / skipped / error), "when", "message"
(the first line of a failure's report, or a skip's reason)}, flushed at once. A step stopped at its
time limit prints no pytest summary line; this file still says how many tests finished and which
failed, and gpu_check.py's summary lists them. Under pytest-xdist only the controller writes (the
workers' reports reach it), so the lines never interleave.
"""

from __future__ import annotations

import json
import os

ENV_VAR = "GPU_CHECK_OUTCOMES"


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]  # (path, line, "Skipped: reason")
    text = getattr(report, "longreprtext", "") or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The exception line of a traceback ("E   AssertionError: ..."), else its last line.
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[0][1:].strip() if errors else lines[-1] if lines else "")[:300]


class _Recorder:
    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every finished line

    def pytest_runtest_logreport(self, report):
        # A test's one outcome: its call, or a setup that failed or skipped it; a teardown only when it fails.
        if report.when == "call" or (report.when == "setup" and not report.passed) or (
                report.when == "teardown" and report.failed):
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            self.file.write(json.dumps(dict(id=report.nodeid, outcome=outcome, when=report.when,
                                            message="" if report.passed else _message(report))) + "\n")

    def pytest_unconfigure(self, config):
        self.file.close()


def pytest_configure(config):
    path = os.environ.get(ENV_VAR)
    if path and not hasattr(config, "workerinput"):  # not in a pytest-xdist worker
        config.pluginmanager.register(_Recorder(path), "gpu_check_outcomes")


def read(path: str) -> list[dict]:
    """The outcomes a run recorded (lines cut off by a kill are dropped)."""
    found = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return found
