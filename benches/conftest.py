"""Keeps the timed benchmarks out of ordinary test runs: tests that use pytest-benchmark's `benchmark`
fixture run only under `pytest benches/ --benchmark-only`; the benchmark scripts' own tests always run."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_ops, gpu_check and utils import each other


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benches/ --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
