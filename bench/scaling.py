#!/usr/bin/env python3
"""How the backup scales with worker processes, and where the ceiling is.

For each data set (``tiny``: 200,000 files of ~40 bytes in 400 directories;
``real``: a copy of system directories, see ``real_tree.py``) an initial
backup runs with ``--num-threads=1`` pinned to one core (``taskset -c 0``)
and ``--num-threads=2`` on two cores, each into a fresh repository on its own
server (pinned to the same cores, as it shares the machine). Reported: wall
time, files per second, client CPU (all processes) and server CPU.

The ceiling: the main process claims objects, builds trees and feeds the
upload stream for every worker, so it bounds how far more workers help. A
sampling profiler (py-spy, ``--gil``: only samples holding the interpreter
lock) measures the share of the run the main process holds the GIL; files
per second divided by that share is the rate at which the main process
would be saturated.

    .venv/bin/python bench/scaling.py --work /tmp/scaling
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import compare
from real_tree import copy_real_tree

PY = sys.executable


def tiny_tree(root: str, dirs: int = 400, per_dir: int = 500) -> int:
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d:03d}"))
        for f in range(per_dir):
            with open(os.path.join(root, f"d{d:03d}", f"f{f:03d}.txt"), "w") as handle:
                handle.write(f"tiny file {d} {f} of the scaling benchmark\n")
    return dirs * per_dir


def _ticks(pid: int) -> float:
    return compare._proc_cpu(pid)


def one_backup(data: str, work: str, workers: int, cores: str, profile: bool) -> dict:
    """An initial backup into a fresh repository; wall, CPU and (``profile``) GIL share."""
    tool = compare.Pysrbup(f"n{workers}", compare.ROOT, work, workers, PY)
    tool.setup()
    taskset = ["taskset", "-c", cores]
    subprocess.run([*taskset[:2], "-p", cores, str(tool.server.pid)], capture_output=True)
    try:
        token = os.path.join(tool.repo, "init-token")
        with open(token) as handle:
            tool.env["PYSRBUP_INIT_TOKEN"] = handle.read().strip()
        cmd = [*taskset, *tool._client("backup", data, tool.key)]
        if profile:
            raw = os.path.join(work, "gil.txt")
            before = _ticks(tool.server.pid)
            t0 = time.perf_counter()
            spy = [_py_spy(), "record", "--gil", "-r", "100", "-f", "raw", "-o", raw, "--"]
            subprocess.run([*spy, *cmd], env=tool.env, cwd=compare.ROOT, capture_output=True)
            seconds = time.perf_counter() - t0
            server_cpu = _ticks(tool.server.pid) - before
            share = _samples(raw) / max(1.0, seconds * 100)
            return {"seconds": seconds, "server_cpu": server_cpu, "gil_share": share}
        before = _ticks(tool.server.pid)
        run, _, _ = compare.wait4_run(cmd, env=tool.env, cwd=compare.ROOT)
        return {
            "seconds": run.seconds,
            "client_cpu": run.cpu,
            "server_cpu": _ticks(tool.server.pid) - before,
            "rss": run.max_rss,
        }
    finally:
        tool.close()


def _py_spy() -> str:
    """py-spy beside this Python, installed into its environment if missing."""
    path = os.path.join(os.path.dirname(PY), "py-spy")
    if not os.path.exists(path):
        subprocess.run([PY, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return path


def _samples(raw: str) -> int:
    """Samples in which a thread of the main process held the GIL (py-spy ``--gil`` raw)."""
    total = 0
    with open(raw) as handle:
        for line in handle:
            total += int(line.rstrip().rpartition(" ")[2] or 0)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/pysrbup-scaling")
    parser.add_argument("--sets", default="tiny,real", help="comma-separated: tiny, real")
    parser.add_argument("--real-files", type=int, default=100_000)
    args = parser.parse_args(argv)
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    compare.RUN = compare.Runner(args.work)
    rows = []
    try:
        for name in args.sets.split(","):
            data = os.path.join(args.work, name, "data")
            if name == "tiny":
                files = tiny_tree(data)
            else:
                files = copy_real_tree(data, args.real_files)["entries"]
            for workers, cores in ((1, "0"), (2, "0,1")):
                work = os.path.join(args.work, name, f"w{workers}")
                run = one_backup(data, work, workers, cores, profile=False)
                prof = one_backup(data, work + "-gil", workers, cores, profile=True)
                rows.append((name, files, workers, run, prof))
    finally:
        compare.RUN.close()
    print(
        "| data set | workers (cores) | wall | files/s | client CPU | server CPU | "
        "main holds the GIL | main saturates at |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, files, workers, run, prof in rows:
        rate = files / run["seconds"]
        share = prof.get("gil_share")
        ceiling = f"{rate / share:,.0f} files/s" if share else "n/a"
        shown = f"{100 * share:.0f}%" if share else "n/a"
        print(
            f"| {name} ({files:,} entries) | {workers} | {run['seconds']:.1f} s | {rate:,.0f} | "
            f"{run['client_cpu']:.1f} s | {run['server_cpu']:.1f} s | {shown} | {ceiling} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
