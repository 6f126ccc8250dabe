"""Faults end to end: tampering, crashes, full disks, unreadable sources, hostile peers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import grpc
import pytest
import xxhash
from helpers import ServerProcess, assert_no_traceback, base_env, free_port
from trees import random_bytes, snapshot_tree

from pysrbup.server import packs


def _pack_files(repo: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        found += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    return sorted(found)


def _records(path: str) -> list[packs.Entry]:
    entries = packs.read_footer(path)
    assert entries is not None
    return entries


def _backup_two_files(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim.bin").write_bytes(random_bytes(2 * 1024 * 1024, 21))
    (src / "bystander.txt").write_text("unharmed\n")
    return src, client.backup(str(src), key_file)


def _largest_record(repo: str) -> tuple[str, packs.Entry]:
    path = _pack_files(repo)[0]
    return path, max(_records(path), key=lambda e: e.length)


@pytest.mark.server_args("--ecc=none")  # no parity: the client itself must notice
@pytest.mark.parametrize("fix_checksum", [False, True], ids=["bitrot", "forged-checksum"])
def test_tampered_pack_is_detected_at_restore(tmp_path, client, key_file, server, fix_checksum):
    _src, backup_id = _backup_two_files(tmp_path, client, key_file)
    server.settled()
    path, entry = _largest_record(server.repo)
    with open(path, "r+b") as handle:
        handle.seek(entry.offset + entry.length // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))
        if fix_checksum:  # a malicious server also fixes its own checksum
            handle.seek(entry.offset)
            payload = handle.read(entry.length)
            handle.seek(entry.offset - 8)
            handle.write(xxhash.xxh3_64_intdigest(payload).to_bytes(8, "little"))
    out = tmp_path / "out"
    proc = client.run("restore", backup_id, str(out), key_file)
    assert proc.returncode == 3, proc.stderr
    assert "victim.bin" in proc.stderr and "damaged" in proc.stderr
    assert "bystander.txt" not in proc.stderr.split("damaged")[-1]
    assert (out / "src" / "bystander.txt").read_text() == "unharmed\n"
    assert_no_traceback(proc)


@pytest.mark.server_args("--ecc=none")
def test_swapped_objects_are_detected(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    # Below the minimum chunk size (256 KiB): one chunk each, whatever the key's
    # chunk boundaries (300,000 bytes was cut in two by some keys).
    (src / "a.bin").write_bytes(random_bytes(200_000, 1))
    (src / "b.bin").write_bytes(random_bytes(200_000, 2))
    backup_id = client.backup(str(src), key_file)
    server.stop()
    path = _pack_files(server.repo)[0]
    entries = sorted(_records(path), key=lambda e: -e.length)[:2]
    assert entries[0].length == entries[1].length  # same-size chunks: a clean swap
    with open(path, "r+b") as handle:
        blobs = []
        for entry in entries:
            handle.seek(entry.offset)
            blobs.append(handle.read(entry.length))
        for entry, blob in zip(entries, reversed(blobs), strict=False):
            handle.seek(entry.offset - 8)
            handle.write(xxhash.xxh3_64_intdigest(blob).to_bytes(8, "little"))
            handle.write(blob)
    server.start()
    proc = client.run("restore", backup_id, str(tmp_path / "out"), key_file)
    assert proc.returncode == 3
    assert "a.bin" in proc.stderr and "b.bin" in proc.stderr
    assert "failed authentication" in proc.stderr


def test_server_killed_mid_backup_then_rerun(tmp_path, client, key_file, server):
    first_src = tmp_path / "first"
    first_src.mkdir()
    (first_src / "keep.bin").write_bytes(random_bytes(1024 * 1024, 3))
    first_id = client.backup(str(first_src), key_file)

    src = tmp_path / "big"
    src.mkdir()
    for i in range(12):
        (src / f"part{i}.bin").write_bytes(random_bytes(8 * 1024 * 1024, 40 + i))
    server.settled()
    stored_before = sum(os.path.getsize(p) for p in _pack_files(server.repo))
    client.env = dict(client.env, PYSRBUP_RETRY_SECONDS="3")  # give up soon: it stays down
    proc = client.spawn("backup", str(src), key_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some, not all, data has arrived
        stored = sum(os.path.getsize(p) for p in _pack_files(server.repo)) - stored_before
        if stored > 16 * 1024 * 1024:
            break
        time.sleep(0.01)
    server.kill()
    _out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the machine was fast enough to finish first
        pytest.skip("backup finished before the kill")
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "connection" in err or "server" in err

    server.start()
    client.run("restore", first_id, str(tmp_path / "r1"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "r1" / "first")) == snapshot_tree(str(first_src))
    second_id = client.backup(str(src), key_file)
    client.run("restore", second_id, str(tmp_path / "r2"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "r2" / "big")) == snapshot_tree(str(src))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_disk_full_fails_cleanly(tmp_path, key_file, cache_dir):

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    srv = ServerProcess(
        str(mount / "repo"), free_port(), base_env(cache_dir), str(tmp_path / "s.log")
    )
    try:
        srv.start()
        cli = srv.client(cache_dir)
        small = tmp_path / "small_src"
        small.mkdir()
        (small / "f.txt").write_text("fits\n")
        small_id = cli.backup(str(small), key_file)
        big = tmp_path / "big_src"
        big.mkdir()
        (big / "huge.bin").write_bytes(random_bytes(24 * 1024 * 1024, 77))
        proc = cli.run("backup", str(big), key_file)
        assert proc.returncode == 1
        assert "disk is full" in proc.stderr
        assert_no_traceback(proc)
        # The server keeps serving reads, and what it stored before is intact.
        assert small_id in cli.run("list", check=True).stdout
        cli.run("restore", small_id, str(tmp_path / "out"), key_file, check=True)
        assert (tmp_path / "out" / "small_src" / "f.txt").read_text() == "fits\n"
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(mount)])


def test_unreadable_files_are_reported(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("readable")
    (src / "locked.txt").write_text("secret")
    os.chmod(src / "locked.txt", 0)
    prefix: tuple = ()
    if os.geteuid() == 0:  # root reads everything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("setpriv is needed to drop root's read override")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    proc = client.run("backup", str(src), key_file, prefix=prefix)
    assert proc.returncode == 3, proc.stderr
    assert "locked.txt" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("Completed backup id: ")
    assert_no_traceback(proc)


def test_hostile_frames_are_refused_and_server_survives(tmp_path, client, key_file, server):
    from peer import Peer

    from pysrbup.crypto.keyfile import load_key_file
    from pysrbup.proto import service_pb2

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    backup_id = client.backup(str(src), key_file)  # initialises the repository
    peer = Peer(server, load_key_file(key_file))
    stub = peer.stub
    session = peer.begin_session()  # even a key holder's malformed frames are refused
    for garbage in (
        b"",
        b"PSF1\xff\xff\xff\xff",
        b"PSF1\x01\x00\x00\x00" + b"\0" * 36,
        os.urandom(999),
    ):
        try:
            peer.upload(session.upload_metadata(), [garbage])
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert garbage == b"" or garbage.startswith(b"PSF1\x00")
    with pytest.raises(grpc.RpcError) as info:
        peer.fetch([b"x" * 33])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for bad_id in ("../../etc/passwd", "0" * 15, "ZZZZZZZZZZZZZZZZ"):
        with pytest.raises(grpc.RpcError):
            peer.commit(session, bad_id, b"x")
    channel = peer.channel
    # A destructive request without a valid proof is refused.
    challenge = stub.GetChallenge(service_pb2.ChallengeRequest()).challenge
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteSnapshot(
            service_pb2.DeleteSnapshotRequest(
                snapshot_id=backup_id, challenge=challenge, signature=b"\0" * 64
            )
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    assert backup_id in client.run("list", check=True).stdout
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    shutil.rmtree(tmp_path / "out")
