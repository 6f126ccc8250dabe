"""pytest configuration for every benchmark under bench/ (kernels, pipeline stages, parity).

Benchmarks live in ``bench_*.py`` files, which plain ``pytest`` (testpaths =
tests) never collects; ``pytest bench --benchmark-only`` (``./build.sh bench``)
does, through the hook below. The ``throughput`` fixture records MB/s (best
round) in the benchmark's ``extra_info`` and prints a table per group at the
end, with ratios to the native kernel where a group has one.
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
def throughput(benchmark, request) -> Callable[..., float]:
    """Runs ``fn`` under pytest-benchmark and records ``nbytes / best time`` in MB/s."""

    def run(
        fn: Callable[[], object], nbytes: int, rounds: int = 5, group: str = "", setup=None
    ) -> float:
        benchmark.group = group or None
        if setup is None:
            benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return 0.0
        mbps = nbytes / stats.stats.min / 1e6
        benchmark.extra_info["MB/s"] = round(mbps, 1)
        request.config.stash[_RESULTS][request.node.name] = (group, mbps)
        return mbps

    return run


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    tr = terminalreporter
    tr.section("throughput (best round, MB/s of input data)")
    groups: dict[str, list[tuple[str, float]]] = {}
    for name, (group, mbps) in results.items():
        groups.setdefault(group, []).append((name, mbps))
    for group, rows in sorted(groups.items()):
        base = max((m for n, m in rows if "native" in n), default=None)
        for name, mbps in sorted(rows, key=lambda r: -r[1]):
            ratio = f"  native is {base / mbps:8.1f}x this" if base and "native" not in name else ""
            tr.write_line(f"{group:<22} {name:<48} {mbps:10.1f} MB/s{ratio}")
