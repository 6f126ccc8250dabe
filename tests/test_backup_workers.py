"""The multiprocess backup pipeline: worker processes, shared-memory arenas, tree assembly.

Backups run against real servers (in-process for the ones that look inside
the pipeline, a subprocess for the CLI); every one is restored and compared.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
from helpers import assert_no_traceback
from inprocess import in_process_server
from trees import make_full_tree, random_bytes, snapshot_tree

from pysrbup.client import workers
from pysrbup.client.backup import Backup
from pysrbup.client.excludes import Excludes
from pysrbup.client.filescache import RACY_SECONDS
from pysrbup.client.restore import Restore
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree


def _random_node(rng: random.Random, name: bytes) -> repo_pb2.Node:
    node = repo_pb2.Node(name=name, type=rng.choice([1, 2, 3]), mode=rng.randrange(0o7777))
    node.uid, node.gid, node.mtime_ns = (
        rng.randrange(70000),
        rng.randrange(70000),
        rng.getrandbits(62),
    )
    if node.type == 1:
        count = rng.randrange(0, 40)
        node.size = rng.getrandbits(40)
        node.chunk_ids = rng.randbytes(32 * count)
        node.chunk_sizes = rng.randbytes(4 * count)
    elif node.type == 2:
        node.subtree = rng.randbytes(32)
    else:
        node.link_target = rng.randbytes(rng.randrange(1, 300))
    node.user, node.group = "user" * rng.randrange(3), "grp"
    for i in range(rng.randrange(3)):
        node.xattrs.add(name=b"user.%d" % i, value=rng.randbytes(rng.randrange(200)))
    return node


def test_trees_from_encoded_nodes_are_the_bytes_serialize_makes():
    rng = random.Random(5)
    for count in (0, 1, 2, 17, 300):
        names = sorted(
            {rng.randbytes(rng.randrange(1, 40)).replace(b"/", b"x") for _ in range(count)}
        )
        nodes = [_random_node(rng, name) for name in names]
        encoded = [n.SerializeToString(deterministic=True) for n in nodes]
        assert tree.encode(encoded) == tree.serialize(nodes)


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSRBUP_CACHE_DIR", str(tmp_path / "cache"))
    with in_process_server(str(tmp_path / "repo")) as served:
        yield served


def _restored(served, backup_id: str, target) -> None:
    Restore(served.remote, 2).run(backup_id, str(target))


def test_small_arenas_are_retired_reused_and_nothing_is_lost(tmp_path, served, monkeypatch):
    # Arenas of 5 MiB (the largest sealed chunk just fits): workers fill, retire and
    # wait for them over and over; the uploader frames them out of shared memory.
    monkeypatch.setattr(workers, "ARENA_BYTES", 5 * 1024 * 1024)
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d:02d}").mkdir(parents=True)
        for f in range(40):
            size = random.Random(d * 100 + f).randrange(0, 300_000)
            (src / f"d{d:02d}" / f"f{f:02d}.bin").write_bytes(random_bytes(size, d * 100 + f))
    (src / "big.bin").write_bytes(random_bytes(30 * 1024 * 1024, 77))
    result = Backup(served.remote, 2).run(str(src))
    assert result.files == 30 * 40 + 1 and not result.errors
    _restored(served, result.backup_id, tmp_path / "out")
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    assert multiprocessing.active_children() == []  # the workers are gone


@pytest.mark.parametrize("ahead", [1, 200])
def test_read_ahead_over_mixed_entries_loses_nothing(tmp_path, served, monkeypatch, ahead):
    # Entries are looked at (lstat, files cache, open) up to ``ahead`` before they are
    # saved: every kind, excluded and too large entries, and an incremental run.
    monkeypatch.setattr(workers, "READ_AHEAD_ENTRIES", ahead)
    monkeypatch.setattr(workers, "READ_AHEAD_BYTES", 4096)  # smaller than most files here
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(ahead)
    for i in range(120):
        kind = i % 6
        path = src / f"e{i:03d}"
        if kind == 0:
            path.write_bytes(b"")
        elif kind in (1, 2):
            path.write_bytes(random_bytes(rng.randrange(1, 300_000), i))
        elif kind == 3:
            os.symlink(f"e{i - 1:03d}", path)
        elif kind == 4:
            path.mkdir()
            (path / "inner.txt").write_bytes(random_bytes(5000, i))
        else:
            os.mkfifo(path)
    (src / "skip.tmp").write_bytes(b"excluded")
    (src / "huge.bin").write_bytes(random_bytes(3 * 1024 * 1024, 5))
    time.sleep(RACY_SECONDS + 0.1)  # settled: the files cache keeps them
    rules = Excludes.from_options(exclude=["*.tmp"], exclude_larger_than="2M")
    first = Backup(served.remote, 2, excludes=rules).run(str(src))
    assert not first.errors and first.files == 120 // 6 * 3 + 120 // 6
    (src / "e001").write_bytes(b"changed since the first backup")
    second = Backup(served.remote, 2, excludes=rules).run(str(src))
    assert not second.errors and second.files_cached == first.files - 1  # all but e001
    assert second.bytes_hashed == len(b"changed since the first backup")
    _restored(served, second.backup_id, tmp_path / "out")
    os.unlink(src / "skip.tmp")
    os.unlink(src / "huge.bin")
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))


def test_the_same_chunk_from_several_workers_is_stored_once(tmp_path, served):
    src = tmp_path / "src"
    same = random_bytes(200_000, 9)
    for d in range(12):
        (src / f"d{d}").mkdir(parents=True)
        (src / f"d{d}" / "copy.bin").write_bytes(same)
    result = Backup(served.remote, 2).run(str(src))
    # One chunk for the 12 copies, 12 distinct directory trees (names differ by d),
    # the source directory's tree and the root tree.
    assert result.chunks_new == 1 + 12 + 1 + 1, result
    assert result.bytes_new < 300_000
    _restored(served, result.backup_id, tmp_path / "out")
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))


@pytest.mark.parametrize("processes", [1, 3])
def test_any_number_of_workers_gives_the_same_backup(tmp_path, served, processes):
    src = str(tmp_path / "src")
    make_full_tree(src)
    first = Backup(served.remote, processes).run(src)
    second = Backup(served.remote, 2).run(src)
    records = {s.snapshot_id: served.remote.open_snapshot(s) for s in served.remote.snapshots()}
    # The same tree bytes whatever the number of workers: the same root tree id.
    assert records[first.backup_id].root_tree == records[second.backup_id].root_tree
    _restored(served, first.backup_id, tmp_path / "out")
    assert snapshot_tree(src) == snapshot_tree(str(tmp_path / "out" / "src"))


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    """The backup's worker processes: forked children (other children run ldconfig...)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            kids = [int(p) for p in handle.read().split()]
    except OSError:
        return []
    own = _cmdline(pid)
    return [kid for kid in kids if _cmdline(kid) == own]


def _backup_with_workers(tmp_path, client, key_file, dirs: int, mib: int, workers: int):
    """A backup of ``dirs`` random files of ``mib`` MiB, started once ``workers`` are up."""
    src = tmp_path / "src"
    for d in range(dirs):
        (src / f"d{d}").mkdir(parents=True)
        (src / f"d{d}" / "data.bin").write_bytes(random_bytes(mib * 1024 * 1024, d))
    proc = client.spawn("backup", str(src), key_file)
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, _children(proc.pid)


def test_a_killed_worker_fails_the_backup_in_one_line(tmp_path, client, key_file):
    proc, victims = _backup_with_workers(tmp_path, client, key_file, 40, 6, 1)
    assert victims, "no worker processes appeared"
    os.kill(victims[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [
        "pysrbup-client: error: a backup worker process died (killed by signal 9); "
        "nothing was committed"
    ], err
    assert "Traceback" not in err
    listed = client.run("list", check=True)
    assert_no_traceback(listed)
    assert "Completed backup id" not in out


def test_workers_die_with_a_killed_backup(tmp_path, client, key_file):
    proc, orphans = _backup_with_workers(tmp_path, client, key_file, 30, 4, 2)
    assert orphans
    proc.kill()
    proc.communicate(timeout=30)  # returns: no worker holds its stdout or stderr open
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in orphans if os.path.exists(f"/proc/{pid}/status")]
    zombies = []
    for pid in alive:
        with open(f"/proc/{pid}/status") as handle:
            if "State:\tZ" in handle.read():
                zombies.append(pid)
    assert alive == zombies, "workers outlived their backup"
