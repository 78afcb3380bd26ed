"""Keeps the benchmarks out of ordinary test runs: they run only under `pytest benches/ --benchmark-only`."""

import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benches/ --benchmark-only`")
    for item in items:
        item.add_marker(skip)
