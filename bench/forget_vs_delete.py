"""forget of 90 of 100 backups against 90 separate delete runs, on the same kind of data.

Two fresh repositories each get 100 small backups one day apart (made in this
process, to save time); then one runs ``forget --keep-last 10`` and the other
``delete`` once per backup, each as a real client process against a real
server on loopback. Prints both wall times and the ratio.

    .venv/bin/python bench/forget_vs_delete.py [--backups 100] [--keep 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare(work: str, count: int, env: dict) -> tuple[subprocess.Popen, str, str, list[str]]:
    from pysrbup.client.backup import Backup
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository
    from pysrbup.crypto.keyfile import write_key_file
    from pysrbup.crypto.keys import MasterKey

    os.environ.update(env)
    key = os.path.join(work, "key")
    master = MasterKey.generate()
    write_key_file(key, master)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    repo_dir = os.path.join(work, "repo")
    server = subprocess.Popen(
        [sys.executable, "-m", "pysrbup.cli.server", f"--bind-to={address}", repo_dir],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)
    with open(os.path.join(repo_dir, "init-token")) as handle:
        token = handle.read().strip()
    src = os.path.join(work, "src")
    os.makedirs(src)
    with open(os.path.join(src, "shared.bin"), "wb") as handle:
        handle.write(os.urandom(1 << 20))
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    ids = []
    with Connection(address) as conn:
        remote = RemoteRepository(conn, master)
        remote.initialise(token)
        for day in range(count):
            with open(os.path.join(src, "day.bin"), "wb") as handle:
                handle.write(os.urandom(200_000))
            when = int((start + datetime.timedelta(days=day)).timestamp()) * 10**9
            ids.append(Backup(remote, 2).run(src, time_ns=when).backup_id)
    return server, address, key, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backups", type=int, default=100)
    parser.add_argument("--keep", type=int, default=10)
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="pysrbup-forget-")
    times = {}
    try:
        for mode in ("forget", "delete"):
            work = os.path.join(top, mode)
            os.makedirs(work)
            env = dict(
                os.environ,
                PYTHONPATH=ROOT,
                PYSRBUP_CACHE_DIR=os.path.join(work, "cache"),
                PYSRBUP_CONFIG_DIR=os.path.join(work, "config"),
            )
            server, address, key, ids = _prepare(work, args.backups, env)
            client = [sys.executable, "-m", "pysrbup.cli.client", f"--server-address={address}"]
            try:
                started = time.perf_counter()
                if mode == "forget":
                    cmd = [*client, "forget", "--key-file", key, "--keep-last", str(args.keep)]
                    subprocess.run(cmd, env=env, check=True, capture_output=True)
                else:
                    for backup_id in ids[: args.backups - args.keep]:
                        cmd = [*client, "delete", backup_id, key]
                        subprocess.run(cmd, env=env, check=True, capture_output=True)
                times[mode] = time.perf_counter() - started
            finally:
                server.terminate()
                server.wait()
    finally:
        shutil.rmtree(top, ignore_errors=True)
    removed = args.backups - args.keep
    print(f"forget of {removed} of {args.backups} backups: {times['forget']:.2f} s")
    print(f"{removed} separate deletes:           {times['delete']:.2f} s")
    print(f"ratio (forget / deletes):       {times['forget'] / times['delete']:.3f}")


if __name__ == "__main__":
    main()
