#!/usr/bin/env python3
"""How much of a backup a rerun redoes after the first run was killed half-way.

Data: ``--files`` random files of ``--file-mib`` MiB each (default 40 x 16
MiB), written once and then aged past the files cache's racy window (a file
changed less than a second before it is looked at is never cached, so a
backup started right after the data was written would cache nothing).

For each of ``--rounds`` rounds, into a fresh repository each time: a full
backup is timed; then, in another fresh repository, a backup is killed with
SIGKILL after half the full backup's time and run again. The rerun's wall
time as a share of the full backup's is the figure (the target is under 60%,
every round), with what the rerun read and uploaded, from its summary.

    .venv/bin/python bench/resume.py --work /tmp/resume
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare

MiB = 1024 * 1024


def make_data(root: str, files: int, file_mib: int) -> None:
    """Random files, with times set a minute back (out of the racy window)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(7)
    past = time.time_ns() - 60 * 10**9
    for n in range(files):
        path = os.path.join(root, f"random-{n:03d}.bin")
        with open(path, "wb") as handle:
            handle.write(rng.integers(0, 256, file_mib * MiB, dtype=np.uint8).tobytes())
        os.utime(path, ns=(past, past))


def _tool(work: str, name: str, threads: int) -> compare.Pysrbup:
    tool = compare.Pysrbup(name, compare.ROOT, work, threads, sys.executable)
    shutil.rmtree(tool.work, ignore_errors=True)
    tool.setup()
    with open(os.path.join(tool.repo, "init-token")) as handle:
        tool.env["PYSRBUP_INIT_TOKEN"] = handle.read().strip()
    return tool


def full_backup(work: str, data: str, threads: int) -> float:
    tool = _tool(work, "full", threads)
    try:
        return tool.backup("initial", data).seconds
    finally:
        tool.close()


def killed_and_rerun(work: str, data: str, threads: int, after: float) -> tuple[float, str]:
    """Seconds of the rerun, and its summary lines."""
    tool = _tool(work, "resumed", threads)
    try:
        proc = subprocess.Popen(
            tool._client("backup", data, tool.key),
            env=tool.env,
            cwd=tool.checkout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run, out, _ = compare.wait4_run(tool._client("backup", data, tool.key), tool.env)
        summary = " / ".join(line for line in out.splitlines() if line.startswith("Read"))
        return run.seconds, summary
    finally:
        tool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/pysrbup-resume", help="scratch directory")
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--file-mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="pysrbup --num-threads")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    compare.RUN = compare.Runner(args.work)
    data = os.path.join(args.work, "data")
    if not os.path.isdir(data):
        make_data(data, args.files, args.file_mib)
    print("| round | full backup | killed after | rerun | rerun / full | rerun's summary |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    try:
        for n in range(1, args.rounds + 1):
            full = full_backup(args.work, data, args.threads)
            rerun, summary = killed_and_rerun(args.work, data, args.threads, full / 2)
            worst = max(worst, rerun / full)
            print(
                f"| {n} | {full:.2f} s | {full / 2:.2f} s | {rerun:.2f} s | "
                f"{100 * rerun / full:.0f}% | {summary} |",
                flush=True,
            )
    finally:
        compare.RUN.close()
    print(f"\nworst rerun: {100 * worst:.0f}% of a full backup (target: under 60%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
