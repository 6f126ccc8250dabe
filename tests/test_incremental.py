"""Incremental and resumable backups, end to end: the files cache, kill -9, server restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import ServerProcess, assert_no_traceback, base_env, free_port
from trees import random_bytes, snapshot_tree

from pysrbup.client.filescache import RACY_SECONDS

MiB = 1024 * 1024


def _backup_json(client, src, key_file) -> dict:
    proc = client.run("--json", "backup", str(src), key_file, check=True)
    assert_no_traceback(proc)
    return json.loads(proc.stdout)


def _packs_bytes(repo: str) -> int:
    total = 0
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".pack"))
    return total


def _make_files(src, count: int, size: int, seed: int) -> None:
    src.mkdir(exist_ok=True)
    for i in range(count):
        (src / f"f{i:03d}.bin").write_bytes(random_bytes(size, seed + i))
    time.sleep(RACY_SECONDS + 0.1)  # recently modified files are not cached


def _start_backup(client, src, key_file) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "pysrbup.cli.client",
        f"--server-address={client.address}",
        "--num-threads=2",
        "--json",
        "backup",
        str(src),
        key_file,
    ]
    return subprocess.Popen(
        cmd, env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_stored(repo: str, at_least: int, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _packs_bytes(repo) >= at_least:
            return True
        time.sleep(0.005)
    return False


def test_unchanged_rebackup_reads_nothing(tmp_path, client, key_file):
    src = tmp_path / "src"
    _make_files(src, 6, 700_000, 1)
    (src / "sub").mkdir()
    (src / "sub" / "small.txt").write_text("hello\n" * 100)
    time.sleep(RACY_SECONDS + 0.1)
    first = _backup_json(client, src, key_file)
    assert first["bytes_hashed"] == first["bytes_read"] > 0
    second = _backup_json(client, src, key_file)
    assert second["bytes_hashed"] == 0
    assert second["files_cached"] == second["files"] == 7
    assert second["bytes_new"] == 0 and second["bytes_sent"] == 0
    out = tmp_path / "out"
    client.run("restore", second["backup_id"], str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


def test_changed_file_is_read_again(tmp_path, client, key_file):
    src = tmp_path / "src"
    _make_files(src, 3, 500_000, 10)
    _backup_json(client, src, key_file)
    victim = src / "f001.bin"
    st = os.stat(victim)
    data = bytearray(victim.read_bytes())
    data[1000:1010] = b"0123456789"  # same size; mtime put back: only ctime tells
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(RACY_SECONDS + 0.1)
    second = _backup_json(client, src, key_file)
    assert second["bytes_hashed"] == len(data)
    assert second["files_cached"] == 2
    out = tmp_path / "out"
    client.run("restore", second["backup_id"], str(out), key_file, check=True)
    assert (out / "src" / "f001.bin").read_bytes() == bytes(data)


def test_killed_backup_reruns_cheaply_and_restores(tmp_path, client, key_file, server, cache_dir):
    src = tmp_path / "src"
    count, size = 32, 3 * MiB
    total = count * size
    _make_files(src, count, size, 100)
    proc = _start_backup(client, src, key_file)
    reached = _wait_for_stored(server.repo, total // 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not reached:
        import pytest

        pytest.skip("the backup finished before it could be killed half-way")
    rerun = _backup_json(client, src, key_file)
    assert rerun["files_cached"] > 0
    assert rerun["bytes_sent"] < 0.6 * total, rerun
    out = tmp_path / "out"
    client.run("restore", rerun["backup_id"], str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))

    # The repository is barely larger than one clean backup of the same data.
    clean = ServerProcess(
        str(tmp_path / "clean_repo"),
        free_port(),
        base_env(str(tmp_path / "clean_cache")),
        str(tmp_path / "clean.log"),
    )
    os.makedirs(tmp_path / "clean_cache")
    clean.start()
    try:
        clean.client(clean.env["PYSRBUP_CACHE_DIR"]).backup(str(src), key_file)
    finally:
        clean.stop()
    assert _packs_bytes(server.repo) <= 1.05 * _packs_bytes(clean.repo)


def test_server_restart_mid_backup_is_survived(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    count, size = 32, 3 * MiB
    _make_files(src, count, size, 300)
    proc = _start_backup(client, src, key_file)
    reached = _wait_for_stored(server.repo, count * size // 3, proc)
    server.kill()
    time.sleep(0.5)
    server.start()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    report = json.loads(out)
    if reached:
        assert report["retries"] > 0, (report, err)
    restored = tmp_path / "out"
    client.run("restore", report["backup_id"], str(restored), key_file, check=True)
    assert snapshot_tree(str(restored / "src")) == snapshot_tree(str(src))


def test_files_cache_log_survives_a_torn_tail(tmp_path):
    from pysrbup.client.filescache import FilesCache

    folder = tmp_path / "cache"
    folder.mkdir()
    path = tmp_path / "file"
    path.write_bytes(b"x" * 10)
    os.utime(path, ns=(1, 1))
    st = os.stat(path)
    now = time.time_ns() + 10**10
    cache = FilesCache(b"r", folder=str(folder)).open()
    cache.add(b"/a", st, b"\1" * 32, b"\0\0\0\0", now)
    cache.add(b"/b", st, b"\2" * 64, b"\0" * 8, now)
    cache.close()
    with open(folder / "files", "ab") as handle:
        handle.write(b"\x50\x00\x00\x00torn")
    again = FilesCache(b"r", folder=str(folder)).open()
    assert len(again) == 2
    assert again.lookup(b"/a", st) is not None and again.lookup(b"/b", st) is not None
    assert again.lookup(b"/b", st).chunk_ids == b"\2" * 64
    again.add(b"/c", st, b"\3" * 32, b"\0" * 4, now)
    again.close()
    third = FilesCache(b"r", folder=str(folder)).open()
    assert len(third) == 3 and third.lookup(b"/c", st).chunk_ids == b"\3" * 32
    third.close()
