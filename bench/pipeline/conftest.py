"""pytest configuration for the pipeline-stage benchmarks.

``bench_*.py`` files here are collected only by ``pytest bench --benchmark-only``
(``./build.sh bench``), never by the normal test run. The ``stage`` fixture
records MB/s (best round) and prints one line per stage at the end, so a
regression in one stage of the backup or restore pipeline shows on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_RESULTS = pytest.StashKey[dict]()


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.stash[_RESULTS] = {}


@pytest.fixture
def stage(benchmark, request) -> Callable[..., float]:
    """Runs ``fn`` under pytest-benchmark and records ``nbytes / best time`` in MB/s."""

    def run(fn: Callable[[], object], nbytes: int, rounds: int = 5, setup=None) -> float:
        benchmark.group = "pipeline stages"
        if setup is None:
            benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return 0.0
        mbps = nbytes / stats.stats.min / 1e6
        benchmark.extra_info["MB/s"] = round(mbps, 1)
        request.config.stash[_RESULTS][request.node.name] = mbps
        return mbps

    return run


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(_RESULTS, {})
    if results:
        terminalreporter.section("pipeline stages: throughput (best round, MB/s of plaintext)")
        for name, mbps in results.items():
            terminalreporter.write_line(f"{name:<48} {mbps:10.1f} MB/s")
