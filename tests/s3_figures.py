"""Figures: an initial backup and a restore with the local store and with S3 (SeaweedFS).

Run by hand (not collected by pytest)::

    .venv/bin/python tests/s3_figures.py [MiB]

The server runs in this process (real gRPC on loopback, a real client as a
subprocess), so the store's own counters give the requests it received and
the bytes sent to it, per step.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import Client, base_env
from seaweed import ACCESS_KEY, SECRET_KEY, seaweedfs
from trees import snapshot_tree

from pysrbup.crypto.keyfile import write_key_file
from pysrbup.crypto.keys import MasterKey
from pysrbup.server.blobstore import LocalStore, S3Location, S3Store
from pysrbup.server.serve import serve
from pysrbup.server.storage import Repository


def make_data(root: str, mib: int) -> None:
    rng = random.Random(1)
    os.makedirs(os.path.join(root, "docs"))
    for i in range(max(1, mib // 16)):
        with open(os.path.join(root, f"random{i}.bin"), "wb") as handle:
            handle.write(rng.randbytes(16 * 1024 * 1024))
    with open(os.path.join(root, "docs", "text.txt"), "w") as handle:
        for i in range(200_000):
            handle.write(f"line {i} of a compressible text file\n")
    for i in range(300):
        with open(os.path.join(root, "docs", f"small{i}.txt"), "w") as handle:
            handle.write(f"small file {i}\n" * (i + 1))


def run(kind: str, work: str, data: str, key: str) -> list[tuple[str, float, dict]]:
    local = os.path.join(work, f"{kind}-local")
    if kind == "local":
        store = LocalStore(local)
    else:
        weed = seaweedfs()
        store = S3Store(
            S3Location(weed.new_bucket(), "bench", weed.endpoint, None, ACCESS_KEY, SECRET_KEY)
        )
    repo = Repository.open(local, store=store)
    server, port = serve(repo, "127.0.0.1:0", 2)
    cache = os.path.join(work, f"{kind}-cache")
    os.makedirs(cache)
    env = dict(base_env(cache), PYSRBUP_INIT_TOKEN=repo.init_token())
    client = Client(f"127.0.0.1:{port}", env)
    steps = []

    def measured(step: str, work_fn) -> object:
        before = store.stats.snapshot()
        start = time.perf_counter()
        result = work_fn()
        seconds = time.perf_counter() - start
        after = store.stats.snapshot()
        steps.append((step, seconds, {k: after.get(k, 0) - before.get(k, 0) for k in after}))
        return result

    def backup() -> str:
        backup_id = client.backup(data, key)
        repo.wait_for_parity()  # parity is part of the backup's cost to the store
        return backup_id

    out = os.path.join(work, f"{kind}-out")
    try:
        backup_id = measured("backup", backup)
        measured("restore", lambda: client.run("restore", backup_id, out, key, check=True))
        assert snapshot_tree(os.path.join(out, "data")) == snapshot_tree(data)
    finally:
        server.stop(grace=None)
        repo.close()
    return steps


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    work = tempfile.mkdtemp(prefix="pysrbup-figures-")
    try:
        data = os.path.join(work, "data")
        make_data(data, mib)
        key = os.path.join(work, "key")
        write_key_file(key, MasterKey.generate())
        size = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(data) for f in files
        )
        print(f"data: {size / 2**20:.1f} MiB in {sum(len(f) for _, _, f in os.walk(data))} files")
        print("| store | step | seconds | MiB sent to store | MiB read from store | requests |")
        print("|---|---|---|---|---|---|")
        for kind in ("local", "s3"):
            for step, seconds, d in run(kind, work, data, key):
                ops = ", ".join(
                    f"{k.removeprefix('requests_')} {v}"
                    for k, v in sorted(d.items())
                    if k.startswith("requests_") and v
                )
                print(
                    f"| {kind} | {step} | {seconds:.2f} | {d['bytes_sent'] / 2**20:.1f} | "
                    f"{d['bytes_received'] / 2**20:.1f} | {d['requests']} ({ops}) |"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
