"""``check``: verifying a repository without restoring it, against real servers on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from types import SimpleNamespace

import pytest
from helpers import assert_no_traceback
from trees import random_bytes

from pysrbup.proto import repo_pb2
from pysrbup.repo import tree
from pysrbup.server import packs


def _pack_files(repo: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        found += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    return sorted(found)


def _entries(repo: str) -> list[tuple[str, packs.Entry]]:
    """(pack path, entry) of every record in every sealed pack."""
    found = []
    for path in _pack_files(repo):
        entries = packs.read_footer(path)
        assert entries is not None, path
        found += [(path, entry) for entry in entries]
    return found


def _make_source(tmp_path, name: str, seed: int):
    """A directory with one big random file, a small one and a nested one."""
    src = tmp_path / name
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "victim.bin").write_bytes(random_bytes(3 * 1024 * 1024, seed))
    (src / "small.txt").write_text(f"small file {seed}\n")
    (src / "dir" / "note.txt").write_text("a note\n")
    return src


def _check(client, key_file, *flags: str, json_output: bool = False):
    pre = ("--json",) if json_output else ()
    proc = client.run(*pre, "check", *flags, "--key-file", key_file)
    assert_no_traceback(proc)
    return proc


def test_healthy_repository(tmp_path, client, key_file):
    client.backup(str(_make_source(tmp_path, "one", 1)), key_file)
    client.backup(str(_make_source(tmp_path, "two", 2)), key_file)
    proc = _check(client, key_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Checked 2 backups" in proc.stdout
    assert "No errors were found" in proc.stdout
    proc = _check(client, key_file, "--read-data", json_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["healthy"] is True
    assert report["backups"] == 2
    assert report["data_objects_read"] == report["data_objects"] > 0
    assert report["bytes_read"] >= 6 * 1024 * 1024
    assert report["problems"] == [] and report["damaged_backups"] == []
    assert proc.stderr == ""
    total = report["data_objects"]
    read = []
    for part in ("1/3", "2/3", "3/3"):  # the n/t groups split the chunks, each read once
        proc = _check(client, key_file, f"--read-data-subset={part}", json_output=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        read.append(json.loads(proc.stdout)["data_objects_read"])
    assert sum(read) == total and max(read) < total


def test_deleted_pack_names_backups_and_paths(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # more than one pack (32 MiB each)
        (src / f"big{i}.bin").write_bytes(random_bytes(14 * 1024 * 1024, 30 + i))
    first = client.backup(str(src), key_file)
    (src / "new.txt").write_text("new\n")
    second = client.backup(str(src), key_file)  # its trees are in a pack of its own
    server.stop()
    assert len(_pack_files(server.repo)) >= 3
    os.unlink(max(_pack_files(server.repo), key=os.path.getsize))
    server.start()
    proc = _check(client, key_file)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("damaged: ")]
    assert any(line.startswith(f"damaged: backup {first}: /") for line in damaged), proc.stdout
    mine = [line for line in damaged if line.startswith(f"damaged: backup {second}: ")]
    assert mine, proc.stdout
    for line in mine:
        assert line.startswith(f"damaged: backup {second}: /src/big"), line
        assert "is missing in the repository" in line, line
    assert "missing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _zero_inside_biggest_record(repo: str) -> None:
    path, entry = max(_entries(repo), key=lambda pe: pe[1].length)
    assert entry.length > 64 * 1024
    with open(path, "r+b") as handle:
        handle.seek(entry.offset + entry.length // 3)
        handle.write(bytes(4096))


@pytest.mark.server_args("--ecc=none")  # no parity: nothing repairs the zeroed range
def test_zeroed_range_is_found_only_by_reading(tmp_path, client, key_file, server):
    backup_id = client.backup(str(_make_source(tmp_path, "src", 4)), key_file)
    server.stop()
    _zero_inside_biggest_record(server.repo)
    server.start()
    proc = _check(client, key_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the object exists
    for flags in (("--read-data",), ("--read-data-subset=100%",), ("--read-data-subset", "1/1")):
        proc = _check(client, key_file, *flags)
        assert proc.returncode == 1, (flags, proc.stdout, proc.stderr)
        assert f"damaged: backup {backup_id}: /src/dir/victim.bin: " in proc.stdout, proc.stdout
        assert "small.txt" not in proc.stdout and "note.txt" not in proc.stdout
    proc = _check(client, key_file, "--read-data", json_output=True)
    report = json.loads(proc.stdout)
    assert report["damaged_backups"] == [backup_id]
    assert report["objects_damaged"] == 1 and report["objects_missing"] == 0
    assert [p["path"] for p in report["problems"]] == ["/src/dir/victim.bin"]


def test_server_claiming_ids_it_lacks(tmp_path, client, key_file, server):
    first = client.backup(str(_make_source(tmp_path, "src", 5)), key_file)
    server.stop()
    big = [entry.oid for _, entry in _entries(server.repo) if entry.length > 64 * 1024]
    assert big
    db = sqlite3.connect(os.path.join(server.repo, "index.sqlite"))
    with db:
        db.executemany("DELETE FROM objects WHERE id = ?", [(oid,) for oid in big])
        (logged,) = db.execute(
            f"SELECT COUNT(*) FROM idlog WHERE id IN ({','.join('?' * len(big))})", big
        ).fetchone()
    db.close()
    assert logged >= len(big)  # the id log still lists them
    server.start()
    proc = _check(client, key_file, json_output=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["objects_missing"] == len(big)
    assert report["damaged_backups"] == [first]
    assert [(p["path"], "missing" in p["problem"]) for p in report["problems"]] == [
        ("/src/dir/victim.bin", True)
    ]
    proc = _check(client, key_file)
    assert f"damaged: backup {first}: /src/dir/victim.bin: object " in proc.stdout
    assert "is missing" in proc.stdout


def test_shared_damage_names_every_backup(tmp_path, client, key_file, server):
    """Two backups share the damaged file's chunks: both are named, each at its own path."""
    src = _make_source(tmp_path, "src", 6)
    first = client.backup(str(src), key_file)
    (src / "dir" / "other.txt").write_text("changes the tree above the shared data\n")
    os.rename(src / "dir" / "victim.bin", src / "renamed.bin")
    second = client.backup(str(src), key_file)
    server.stop()
    big = [entry.oid for _, entry in _entries(server.repo) if entry.length > 64 * 1024]
    db = sqlite3.connect(os.path.join(server.repo, "index.sqlite"))
    with db:
        db.executemany("DELETE FROM objects WHERE id = ?", [(oid,) for oid in big])
    db.close()
    server.start()
    proc = _check(client, key_file)
    assert proc.returncode == 1
    assert f"damaged: backup {first}: /src/dir/victim.bin: " in proc.stdout, proc.stdout
    assert f"damaged: backup {second}: /src/renamed.bin: " in proc.stdout, proc.stdout


def test_many_damaged_files_are_summarised(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02}.bin").write_bytes(random_bytes(100 * 1024, 100 + i))
    (src / "esc\x1b[2Jname.bin").write_bytes(random_bytes(100 * 1024, 99))
    backup_id = client.backup(str(src), key_file)
    server.stop()
    big = [entry.oid for _, entry in _entries(server.repo) if entry.length > 64 * 1024]
    assert len(big) == 31
    db = sqlite3.connect(os.path.join(server.repo, "index.sqlite"))
    with db:
        db.executemany("DELETE FROM objects WHERE id = ?", [(oid,) for oid in big])
    db.close()
    server.start()
    proc = _check(client, key_file)
    assert proc.returncode == 1
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("damaged: ")]
    assert len(damaged) == 21
    assert damaged[-1] == f"damaged: backup {backup_id}: and 11 more"
    assert "\x1b" not in proc.stdout
    proc = _check(client, key_file, json_output=True)
    report = json.loads(proc.stdout)
    assert report["problems_omitted"] == {backup_id: 11}
    assert "/src/esc\\x1b[2Jname.bin" in [p["path"] for p in report["problems"]]  # sorts first


@pytest.mark.parametrize("spec", ["150%", "0%", "0/3", "4/3", "abc", "1/0", ""])
def test_subset_syntax_errors(client, key_file, spec):
    proc = client.run("check", f"--read-data-subset={spec}", "--key-file", key_file)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--read-data-subset" in proc.stderr
    assert_no_traceback(proc)


def test_check_needs_the_key(client):
    proc = client.run("check")
    assert proc.returncode == 2
    assert "key file" in proc.stderr
    assert_no_traceback(proc)


class _FakeRepo:
    """Just what Check uses of RemoteRepository, over a dict of plaintext objects."""

    def __init__(self, objects: dict[bytes, bytes], roots: dict[str, bytes]):
        self.objects = objects
        self.roots = roots

    def snapshots(self):
        return [SimpleNamespace(snapshot_id=sid) for sid in self.roots]

    def open_snapshot(self, info):
        return repo_pb2.Snapshot(root_tree=self.roots[info.snapshot_id])

    def fetch_objects(self, oids):
        for oid in oids:
            plain = self.objects.get(oid)
            why = (
                "" if plain is not None else f"object {oid.hex()[:16]} is missing in the repository"
            )
            yield oid, plain, why

    def missing_objects(self, oids):
        return [oid for oid in oids if oid not in self.objects]


def _dir(name: bytes, subtree: bytes) -> repo_pb2.Node:
    return repo_pb2.Node(name=name, type=repo_pb2.NODE_DIR, subtree=subtree)


def _file(name: bytes, *chunks: bytes) -> repo_pb2.Node:
    return repo_pb2.Node(
        name=name,
        type=repo_pb2.NODE_FILE,
        size=10 * len(chunks),
        chunk_ids=b"".join(chunks),
        chunk_sizes=tree.pack_sizes([10] * len(chunks)),
    )


def _put(objects: dict, nodes: list) -> bytes:
    plain = tree.serialize(nodes)
    oid = hashlib.sha256(plain).digest()
    objects[oid] = plain
    return oid


def test_damage_under_shared_trees_is_named_in_every_backup():
    from pysrbup.client.check import Check

    objects: dict[bytes, bytes] = {}
    chunk, lost_chunk = b"c" * 32, b"l" * 32
    objects[chunk] = b"x" * 10
    lost_tree = b"t" * 32  # referenced, never stored
    garbled = b"g" * 32
    objects[garbled] = b"\xff\xff\xff"  # not a tree
    shared = _put(objects, [_dir(b"gone", lost_tree), _file(b"ok.bin", chunk)])
    src_a = _put(objects, [_dir(b"shared", shared), _file(b"a.bin", chunk, lost_chunk)])
    src_b = _put(objects, [_dir(b"moved", shared), _dir(b"bad\x1b", garbled)])
    roots = {
        "aaaaaaaaaaaaaaaa": _put(objects, [_dir(b"src", src_a)]),
        "bbbbbbbbbbbbbbbb": _put(objects, [_dir(b"src", src_b)]),
        "cccccccccccccccc": _put(objects, [_dir(b"fine", _put(objects, [_file(b"f", chunk)]))]),
    }
    result = Check(_FakeRepo(objects, roots), select=lambda oid: True).run()
    assert result.damaged_backups == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
    assert result.missing == 2 and result.damaged_objects == 1
    lines = sorted(p.line().split(" (Error parsing")[0] for p in result.problems)
    assert lines == [
        "damaged: backup aaaaaaaaaaaaaaaa: /src/a.bin: "
        f"object {lost_chunk.hex()[:16]} is missing in the repository",
        "damaged: backup aaaaaaaaaaaaaaaa: /src/shared/gone: "
        f"object {lost_tree.hex()[:16]} is missing in the repository",
        f"damaged: backup bbbbbbbbbbbbbbbb: /src/bad\\x1b: directory object {garbled.hex()[:16]}: "
        "not a directory tree",
        "damaged: backup bbbbbbbbbbbbbbbb: /src/moved/gone: "
        f"object {lost_tree.hex()[:16]} is missing in the repository",
    ], lines
    assert result.data_read == 1 and not result.healthy
