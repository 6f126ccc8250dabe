"""What error correction costs a backup: default ``--ecc`` against ``--ecc=none``, one run.

For each round and each level (interleaved, so machine noise hits both), a
fresh server and repository on loopback back up the same data set; the
script reports the client's wall time and the time until every sealed pack
also has its parity sidecar, then the median ratios::

    python bench/ecc_cost.py --size-mb 400 --rounds 3

The data set is deterministic: one third random, one third compressible
text, one third a sparse disk-image-like file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(folder: str, size: int) -> None:
    rng = np.random.default_rng(42)
    os.makedirs(folder)
    third = size // 3
    with open(os.path.join(folder, "random.bin"), "wb") as handle:
        handle.write(rng.integers(0, 256, third, dtype=np.uint8).tobytes())
    words = np.array([b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"a", b"lazy", b"dog"])
    with open(os.path.join(folder, "text.txt"), "wb") as handle:
        handle.write(b" ".join(rng.choice(words, third // 5)))
    image = np.zeros(third, dtype=np.uint8)
    for start in rng.integers(0, third - 65536, 200):
        image[start : start + 65536] = rng.integers(0, 256, 65536, dtype=np.uint8)
    with open(os.path.join(folder, "disk.img"), "wb") as handle:
        handle.write(image.tobytes())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parity_done(repo: str) -> bool:
    packs = []
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        packs += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    return bool(packs) and all(os.path.exists(p[: -len(".pack")] + ".ecc") for p in packs)


def run_once(work: str, data: str, key: str, level: str) -> tuple[float, float]:
    repo = os.path.join(work, f"repo-{level}")
    cache = os.path.join(work, f"cache-{level}")
    config = os.path.join(work, f"config-{level}")  # known_servers: a new certificate each run
    for path in (repo, cache, config):
        shutil.rmtree(path, ignore_errors=True)
    env = dict(os.environ, PYSRBUP_CACHE_DIR=cache, PYSRBUP_CONFIG_DIR=config, PYTHONPATH=ROOT)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pysrbup.cli.server",
            f"--bind-to=127.0.0.1:{port}",
            f"--ecc={level}",
            repo,
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        with open(os.path.join(repo, "init-token")) as handle:  # the backup initialises
            env["PYSRBUP_INIT_TOKEN"] = handle.read().strip()
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pysrbup.cli.client",
                f"--server-address=127.0.0.1:{port}",
                "backup",
                data,
                key,
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        backup = time.perf_counter() - started
        while level != "none" and not parity_done(repo):
            time.sleep(0.01)
        return backup, time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level", default="20+2")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="pysrbup-ecc-")
    try:
        data = os.path.join(work, "data")
        make_data(data, args.size_mb * 1024 * 1024)
        key = os.path.join(work, "key")
        env = dict(os.environ, PYTHONPATH=ROOT)
        subprocess.run(
            [sys.executable, "-m", "pysrbup.cli.client", "generate_key", key],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times: dict[str, list[tuple[float, float]]] = {args.level: [], "none": []}
        for _ in range(args.rounds):
            for level in (args.level, "none"):
                times[level].append(run_once(work, data, key, level))
        mb = args.size_mb * 1024 * 1024 / 1e6
        print("| ecc | backup s (median) | MB/s | until parity written s | MB/s |")
        print("|---|---|---|---|---|")
        medians = {}
        for level, runs in times.items():
            backup = statistics.median(t[0] for t in runs)
            total = statistics.median(t[1] for t in runs)
            medians[level] = (backup, total)
            print(
                f"| {level} | {backup:.2f} | {mb / backup:.0f} | {total:.2f} | {mb / total:.0f} |"
            )
        base = medians["none"][0]
        backup_cost = medians[args.level][0] / base - 1
        total_cost = medians[args.level][1] / base - 1
        print(
            f"\nthroughput cost of --ecc={args.level}: backup {backup_cost:+.1%}, "
            f"backup + parity {total_cost:+.1%} (vs --ecc=none backup)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
