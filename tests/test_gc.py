"""Delete and garbage collection: space comes back, live data stays, only key holders destroy."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest
from helpers import (
    ServerProcess,
    assert_no_traceback,
    backup_id_in,
    base_env,
    free_port,
)
from peer import channel_to
from trees import dir_size, random_bytes, snapshot_tree

from pysrbup.crypto.keyfile import load_key_file
from pysrbup.proto import service_pb2, service_pb2_grpc
from pysrbup.repo import auth
from pysrbup.repo.auth import condemn_message


def _pack_bytes(repo: str) -> int:
    """Bytes of pack files (data), parity sidecars excluded."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(os.path.join(repo, "packs"))
        for name in files
        if name.endswith(".pack")
    )


def test_deleting_only_backup_frees_almost_everything(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(random_bytes(12 * 1024 * 1024, 1))
    (src / "b.txt").write_text("text " * 100000)
    backup_id = client.backup(str(src), key_file)
    server.settled()
    before = dir_size(server.repo)
    assert before > 12 * 1024 * 1024
    proc = client.run("--json", "delete", backup_id, key_file, check=True)
    report = json.loads(proc.stdout)
    assert report["deleted"] == [backup_id]
    assert report["bytes_freed"] > 12 * 1024 * 1024
    assert _pack_bytes(server.repo) == 0
    assert dir_size(server.repo) < before * 0.05
    assert client.run("list", check=True).stdout.strip() == ""


def test_deleting_one_of_two_frees_only_unique_data(tmp_path, client, key_file, server):
    shared = random_bytes(6 * 1024 * 1024, 2)
    sources = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "shared.bin").write_bytes(shared)
        (src / "unique.bin").write_bytes(random_bytes(5 * 1024 * 1024, 10 + i))
        sources.append(src)
    keep = client.backup(str(sources[0]), key_file)
    drop = client.backup(str(sources[1]), key_file)
    server.settled()
    before = _pack_bytes(server.repo)
    report = json.loads(client.run("--json", "delete", drop, key_file, check=True).stdout)
    after = _pack_bytes(server.repo)
    unique = 5 * 1024 * 1024
    assert unique * 0.95 < before - after < unique * 1.1
    assert unique * 0.95 < report["bytes_freed"] < unique * 1.25  # data and its parity
    client.run("restore", keep, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src0")) == snapshot_tree(str(sources[0]))
    # Deleting again is harmless: the record is gone, garbage collection just reruns.
    again = client.run("delete", drop, key_file, check=True)
    assert f"Deleted backup {drop}" in again.stdout


def _stub(server):
    channel = channel_to(server)
    return channel, service_pb2_grpc.BackupStub(channel)


def test_destructive_requests_need_a_valid_fresh_proof(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random_bytes(200_000, 3))
    backup_id = client.backup(str(src), key_file)
    server.settled()
    before = dir_size(os.path.join(server.repo, "packs"))
    key = load_key_file(key_file)
    channel, stub = _stub(server)
    info = stub.GetInfo(service_pb2.InfoRequest())
    ids = b"".join(
        b.ids for b in stub.SyncIds(service_pb2.SyncRequest(after_seq=0))
    )  # every object: condemning them all would destroy the backup
    generation = auth.snapshot_set_digest([backup_id])

    def condemn(challenge: bytes, signature: bytes):
        return stub.Condemn(
            service_pb2.CondemnRequest(
                ids=ids, snapshot_set=generation, challenge=challenge, signature=signature
            )
        )

    # No proof, a proof from another key, a proof over other ids: all refused.
    from pysrbup.crypto.keys import MasterKey

    other = MasterKey.generate()
    for make_sig in (
        lambda ch: b"\0" * 64,
        lambda ch: other.destroy_key.sign(condemn_message(info.repo_id, ch, generation, ids)),
        lambda ch: key.destroy_key.sign(condemn_message(info.repo_id, ch, generation, b"")),
    ):
        challenge = stub.GetChallenge(service_pb2.ChallengeRequest()).challenge
        with pytest.raises(grpc.RpcError) as err:
            condemn(challenge, make_sig(challenge))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A made-up challenge is refused even with a correct signature over it.
    fake = os.urandom(32)
    with pytest.raises(grpc.RpcError) as err:
        condemn(fake, key.destroy_key.sign(condemn_message(info.repo_id, fake, generation, ids)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A valid proof works once (here over no ids); replaying it is refused.
    challenge = stub.GetChallenge(service_pb2.ChallengeRequest()).challenge
    empty = key.destroy_key.sign(condemn_message(info.repo_id, challenge, generation, b""))
    request = service_pb2.CondemnRequest(
        ids=b"", snapshot_set=generation, challenge=challenge, signature=empty
    )
    stub.Condemn(request)
    with pytest.raises(grpc.RpcError) as err:
        stub.Condemn(request)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    assert dir_size(os.path.join(server.repo, "packs")) == before
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))


def test_append_only_refuses_deletes(tmp_path, key_file, cache_dir):
    srv = ServerProcess(
        str(tmp_path / "repo"),
        free_port(),
        base_env(cache_dir),
        str(tmp_path / "s.log"),
        extra=("--append-only",),
    )
    srv.start()
    try:
        cli = srv.client(cache_dir)
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("keep me")
        backup_id = cli.backup(str(src), key_file)
        proc = cli.run("delete", backup_id, key_file)
        assert proc.returncode == 1 and "append-only" in proc.stderr
        assert_no_traceback(proc)
        # Also when a key holder bypasses the client's own check.
        key = load_key_file(key_file)
        channel, stub = _stub(srv)
        info = stub.GetInfo(service_pb2.InfoRequest())
        from pysrbup.repo.auth import delete_message

        challenge = stub.GetChallenge(service_pb2.ChallengeRequest()).challenge
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteSnapshot(
                service_pb2.DeleteSnapshotRequest(
                    snapshot_id=backup_id,
                    challenge=challenge,
                    signature=key.destroy_key.sign(
                        delete_message(info.repo_id, challenge, backup_id)
                    ),
                )
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        channel.close()
        assert backup_id in cli.run("list", check=True).stdout
    finally:
        srv.stop()


@pytest.mark.slow
def test_concurrent_backups_and_deletes_never_lose_data(tmp_path, client, key_file):
    """Each round deletes the previous round's backups while new backups reuse their data."""
    completed: dict[str, str] = {}
    previous: list[str] = []
    carried = random_bytes(3 * 1024 * 1024, 500)
    for round_no, delay in enumerate((0.0, 0.15, 0.4, 0.8, 1.2)):
        procs = []
        for i in range(2):
            src = tmp_path / f"r{round_no}c{i}"
            src.mkdir()
            (src / "carried.bin").write_bytes(carried)  # deduplicated against the doomed backups
            (src / "fresh.bin").write_bytes(random_bytes(2 * 1024 * 1024, 1000 * round_no + i))
            procs.append((str(src), client.spawn("backup", str(src), key_file)))
        time.sleep(delay)
        deleters = [client.spawn("delete", old, key_file) for old in previous]
        for proc in deleters:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        for old in previous:
            completed.pop(old, None)
        previous = []
        for src, proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            backup_id = backup_id_in(out)
            completed[backup_id] = src
            previous.append(backup_id)
        carried = random_bytes(3 * 1024 * 1024, 600 + round_no)
    for backup_id, src in completed.items():
        out = tmp_path / f"restore-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        assert snapshot_tree(str(out / os.path.basename(src))) == snapshot_tree(src)


@pytest.mark.slow
def test_client_killed_during_delete_then_rerun(tmp_path, client, key_file, server):
    shared = random_bytes(2 * 1024 * 1024, 7)
    sources = {}
    for i in range(4):
        src = tmp_path / f"s{i}"
        src.mkdir()
        (src / "shared.bin").write_bytes(shared)
        (src / "own.bin").write_bytes(random_bytes(3 * 1024 * 1024, 70 + i))
        sources[client.backup(str(src), key_file)] = str(src)
    for victim, delay in zip(list(sources)[:3], (0.05, 0.3, 0.6), strict=True):
        proc = client.spawn("delete", victim, key_file)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        for backup_id, src in sources.items():
            if backup_id == victim:
                continue
            out = tmp_path / f"check-{victim}-{backup_id}"
            client.run("restore", backup_id, str(out), key_file, check=True)
            assert snapshot_tree(str(out / os.path.basename(src))) == snapshot_tree(src)
        rerun = client.run("delete", victim, key_file, check=True)
        assert f"Deleted backup {victim}" in rerun.stdout
        del sources[victim]
    (survivor,) = sources
    # What is left is one backup's worth of data: shared + own, compressed away nothing.
    assert _pack_bytes(server.repo) < 5.5 * 1024 * 1024
    out = tmp_path / "final"
    client.run("restore", survivor, str(out), key_file, check=True)
    assert snapshot_tree(str(out / os.path.basename(sources[survivor]))) == snapshot_tree(
        sources[survivor]
    )


class _PausingProgress:
    """A progress sink that holds the backup still once it has read ``after`` bytes."""

    def __init__(self, after: int):
        import threading

        self.after = after
        self.seen = 0
        self.paused = threading.Event()
        self.release = threading.Event()

    def add_bytes(self, count: int) -> None:
        self.seen += count
        if self.seen >= self.after and not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(120)

    def set_total(self, total: int) -> None:
        pass

    def add_file(self) -> None:
        pass

    def close(self) -> None:
        pass


def _share_cli_caches(monkeypatch, client) -> None:
    """In-process clients of this test use the CLI client's caches and pinned certificates."""
    monkeypatch.setenv("PYSRBUP_CACHE_DIR", client.env["PYSRBUP_CACHE_DIR"])
    monkeypatch.setenv("PYSRBUP_CONFIG_DIR", client.env["PYSRBUP_CONFIG_DIR"])  # known_servers


def _backup_in_thread(server, key_file, progress, source):
    """Starts an in-process backup of ``source`` (paused by ``progress``); (thread, result)."""
    import threading

    from pysrbup.client.backup import Backup
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository

    result: dict = {}

    def run_backup():
        conn = Connection(server.address)
        try:
            repo = RemoteRepository(conn, load_key_file(key_file))
            result["id"] = Backup(repo, 2, progress=progress).run(str(source)).backup_id
        except Exception as exc:  # handed to the test thread
            result["error"] = exc
        finally:
            conn.close()

    thread = threading.Thread(target=run_backup)
    thread.start()
    return thread, result


def test_backup_paused_across_a_delete_revives_what_it_reuses(
    tmp_path, client, key_file, server, monkeypatch
):
    """A delete condemns chunks a running backup deduplicated against; the backup must keep them."""

    _share_cli_caches(monkeypatch, client)
    old = tmp_path / "old"
    old.mkdir()
    (old / "a_reused.bin").write_bytes(random_bytes(3 * 1024 * 1024, 31))
    old_id = client.backup(str(old), key_file)
    new = tmp_path / "new"
    new.mkdir()
    (new / "a_reused.bin").write_bytes((old / "a_reused.bin").read_bytes())
    (new / "b_fresh.bin").write_bytes(random_bytes(2 * 1024 * 1024, 32))

    progress = _PausingProgress(after=3 * 1024 * 1024 + 1)  # inside b_fresh.bin
    thread, result = _backup_in_thread(server, key_file, progress, new)
    assert progress.paused.wait(60)
    report = json.loads(client.run("--json", "delete", old_id, key_file, check=True).stdout)
    assert report["bytes_pending"] > 2 * 1024 * 1024  # condemned, held for the running backup
    progress.release.set()
    thread.join(120)
    assert "error" not in result, result.get("error")
    client.run("restore", result["id"], str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "new")) == snapshot_tree(str(new))


def test_backup_revives_what_a_delete_condemned_after_another_client_synced(
    tmp_path, client, key_file, server, monkeypatch
):
    """The id cache folder is shared: a backup must see condemnations another client read first.

    The delete condemns chunks the paused backup reuses; then another backup on
    the same machine syncs the shared id cache past those condemnations. The
    paused backup's commit must still revive them, or its snapshot loses them.
    """

    _share_cli_caches(monkeypatch, client)
    old = tmp_path / "old"
    old.mkdir()
    (old / "a_reused.bin").write_bytes(random_bytes(3 * 1024 * 1024, 41))
    old_id = client.backup(str(old), key_file)
    new = tmp_path / "new"
    new.mkdir()
    (new / "a_reused.bin").write_bytes((old / "a_reused.bin").read_bytes())
    (new / "b_fresh.bin").write_bytes(random_bytes(2 * 1024 * 1024, 42))
    other = tmp_path / "other"
    other.mkdir()
    (other / "small.txt").write_text("another client of this machine\n")

    progress = _PausingProgress(after=3 * 1024 * 1024 + 1)  # inside b_fresh.bin
    thread, result = _backup_in_thread(server, key_file, progress, new)
    try:
        assert progress.paused.wait(60)
        report = json.loads(client.run("--json", "delete", old_id, key_file, check=True).stdout)
        assert report["bytes_pending"] > 2 * 1024 * 1024  # held for the running backup
        client.backup(str(other), key_file)  # syncs the shared id cache past the condemnations
    finally:
        progress.release.set()
        thread.join(120)
    assert "error" not in result, result.get("error")
    client.run("restore", result["id"], str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "new")) == snapshot_tree(str(new))


def test_delete_opens_a_backup_committed_after_it_read_the_session_keys(
    tmp_path, client, key_file, server, monkeypatch
):
    """The delete reads the session keys when it opens the doomed record; a backup
    committed after that names a key it has not seen, which must not stop the collection."""
    from pysrbup.client.connection import Connection
    from pysrbup.client.gc import collect_garbage
    from pysrbup.client.repository import RemoteRepository

    _share_cli_caches(monkeypatch, client)
    sources = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "f.bin").write_bytes(random_bytes(300_000, 50 + i))
        sources.append(src)
    doomed = client.backup(str(sources[0]), key_file)
    with Connection(server.address) as conn:
        repo = RemoteRepository(conn, load_key_file(key_file))
        repo.open_snapshot(repo.find_snapshot(doomed))  # as delete does: the keys are read
        kept = client.backup(str(sources[1]), key_file)  # under a session key stored now
        repo.delete_snapshot(doomed)
        result = collect_garbage(repo)
    assert result.snapshots == 1 and result.condemned > 0
    client.run("restore", kept, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src1")) == snapshot_tree(str(sources[1]))


def test_retag_refuses_to_commit_over_a_concurrent_delete(
    tmp_path, client, key_file, server, monkeypatch
):
    """Retag commits with ``revive=False``: a delete of its backup between its id sync
    and its commit must fail the commit, never resurrect the deleted backup's data."""
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository
    from pysrbup.client.retag import retag
    from pysrbup.client.selection import Listed
    from pysrbup.errors import ConcurrentDeleteError

    _share_cli_caches(monkeypatch, client)
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(random_bytes(2 * 1024 * 1024, 51))
    kept_id = client.backup(str(src), key_file)
    (src / "data.bin").write_bytes(random_bytes(2 * 1024 * 1024, 52))
    doomed_id = client.backup(str(src), key_file)

    class DeletedBeforeCommit(RemoteRepository):
        """The race, made certain: the backup is deleted right before the commit."""

        def commit_backup(self, *args, **kwargs):
            client.run("delete", doomed_id, key_file, check=True)
            return super().commit_backup(*args, **kwargs)

    with Connection(server.address) as conn:
        key = load_key_file(key_file)
        plain = RemoteRepository(conn, key)
        info = plain.find_snapshot(kept_id)
        renamed = retag(plain, Listed(info, plain.open_snapshot(info)), ["kept"])  # no race
        racing = DeletedBeforeCommit(conn, key)
        info = racing.find_snapshot(doomed_id)
        with pytest.raises(ConcurrentDeleteError):
            retag(racing, Listed(info, racing.open_snapshot(info)), ["doomed"])

    listed = json.loads(client.run("--json", "list", check=True).stdout)
    assert [row["id"] for row in listed["backups"]] == [renamed]
    proc = client.run("restore", renamed, str(tmp_path / "out"), key_file, check=True)
    assert_no_traceback(proc)
    assert (tmp_path / "out" / "src" / "data.bin").read_bytes() == random_bytes(2 * 1024 * 1024, 51)
