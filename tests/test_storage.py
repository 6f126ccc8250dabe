"""The server's storage layer driven directly: packs, index, recovery, durability rules."""

from __future__ import annotations

import os

import pytest
from helpers import initialise_repository

from pysrbup.client.session import WriteSession
from pysrbup.crypto.keys import MasterKey
from pysrbup.errors import NotFoundError, RepositoryError, UsageError
from pysrbup.repo import auth
from pysrbup.server import packs
from pysrbup.server import sessions as sessions_module
from pysrbup.server.storage import Repository, Session

KEY = MasterKey(bytes(range(32)))


def _begin(repo: Repository) -> tuple[Session, int]:
    """A signed session (initialising the repository for KEY first) and its upload stream."""
    if not repo.initialised:
        initialise_repository(repo, KEY)
    private, public = WriteSession.new_key()
    challenge = repo.new_challenge()
    signature = KEY.write_key.sign(auth.begin_message(repo.repo_id, challenge, public))
    writer = WriteSession(repo.repo_id, repo.begin_session(challenge, public, signature), private)
    proof = writer.proof(auth.OP_UPLOAD)
    session = repo.session(proof.session_id, proof.seq, proof.signature, auth.OP_UPLOAD, b"")
    return session, repo.open_stream(session)


def _has(repo: Repository, oid: bytes) -> bool:
    return repo.has_objects([oid]) == b"\x01"


def _oid(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def _crash(repo: Repository) -> None:
    """Drops the repository like a killed process would: no sealing, no clean close."""
    for session in repo._sessions.values():
        if session.writer is not None:
            session.writer.abandon()
    repo.index.close()
    repo._release()


def test_append_sync_fetch_and_dedup(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    sid = _begin(repo)
    counts = repo.append(*sid, [(_oid(i), 0, os.urandom(1000 + i)) for i in range(5)])
    assert counts.stored == 5
    again = repo.append(*sid, [(_oid(1), 0, b"dup"), (_oid(9), 0, b"new")])
    assert (again.stored, again.dropped) == (1, 1)
    repo.sync(*sid)
    assert [oid for _, oid, _ in repo.index.log_after(0, 100, 1 << 62)] == [
        _oid(i) for i in (0, 1, 2, 3, 4, 9)
    ]
    fetched = {oid: (status, bytes(data)) for oid, status, data in repo.fetch([_oid(9), _oid(77)])}
    assert fetched[_oid(9)] == (0, b"new")
    assert fetched[_oid(77)][0] == 1
    repo.close()


def test_second_session_drops_what_first_committed(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    first, second = _begin(repo), _begin(repo)
    repo.append(*first, [(_oid(1), 0, b"a" * 100)])
    repo.sync(*first)
    counts = repo.append(*second, [(_oid(1), 0, b"a" * 100), (_oid(2), 0, b"b" * 100)])
    assert (counts.stored, counts.dropped) == (1, 1)
    repo.close()


def test_crash_recovery_keeps_intact_records_and_drops_torn_tail(tmp_path):
    root = str(tmp_path / "r")
    repo = Repository.open(root)
    sid = _begin(repo)
    payloads = {_oid(i): os.urandom(5000) for i in range(4)}
    repo.append(*sid, list((oid, 0, p) for oid, p in payloads.items()))
    repo.sync(*sid)
    pack_path = sid[0].writer.path
    _crash(repo)
    with open(pack_path, "ab") as handle:  # a record torn by the crash
        handle.write(packs.RECORD.pack(_oid(99), 5000, 0) + b"partial")

    repo = Repository.open(root)
    assert not os.path.exists(pack_path)  # sealed and moved from staging into the store
    name = repo.packs.names[sid[0].pack]
    entries = packs.read_footer(os.path.join(root, name))
    assert entries is not None and {e.oid for e in entries} == set(payloads)
    got = {oid: bytes(data) for oid, status, data in repo.fetch(list(payloads)) if status == 0}
    assert got == payloads
    assert not _has(repo, _oid(99))
    repo.close()


def test_unsynced_records_are_rolled_back(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    sid = _begin(repo)
    repo.append(*sid, [(_oid(1), 0, b"kept")])
    repo.sync(*sid)
    repo.append(*sid, [(_oid(2), 0, b"dropped")])
    repo.rollback(*sid)
    repo.sync(*sid)
    assert _has(repo, _oid(1)) and not _has(repo, _oid(2))
    repo.close()


def test_durable_records_reach_the_index_in_batches_and_are_never_lost(tmp_path, monkeypatch):
    """A sync without ``index`` only fsyncs; the index gets the records once
    INDEX_BATCH are waiting, when the stream fails, or after a crash (recovery)."""
    monkeypatch.setattr(sessions_module, "INDEX_BATCH", 3)
    root = str(tmp_path / "r")
    repo = Repository.open(root)
    sid = _begin(repo)
    repo.append(*sid, [(_oid(1), 0, b"one"), (_oid(2), 0, b"two")])
    repo.sync(*sid, index=False)
    assert not _has(repo, _oid(1))  # durable, not yet visible
    again = repo.append(*sid, [(_oid(1), 0, b"one")])  # the session itself still knows it
    assert (again.stored, again.dropped) == (0, 1)
    repo.append(*sid, [(_oid(3), 0, b"three")])
    repo.sync(*sid, index=False)  # three waiting: a batch
    assert all(_has(repo, _oid(i)) for i in (1, 2, 3))

    repo.append(*sid, [(_oid(4), 0, b"four")])
    repo.sync(*sid, index=False)
    repo.append(*sid, [(_oid(5), 0, b"five")])
    repo.rollback(*sid)  # the stream failed: the durable record is indexed, the rest dropped
    assert _has(repo, _oid(4)) and not _has(repo, _oid(5))

    repo.append(*sid, [(_oid(6), 0, b"six")])
    repo.sync(*sid, index=False)
    _crash(repo)
    repo = Repository.open(root)  # recovery indexes the staged pack's records
    got = {oid: bytes(data) for oid, status, data in repo.fetch([_oid(4), _oid(6)]) if status == 0}
    assert got == {_oid(4): b"four", _oid(6): b"six"}
    repo.close()


def test_pack_rotation_seals_full_packs(tmp_path, monkeypatch):
    monkeypatch.setattr(packs, "TARGET_PACK_SIZE", 64 * 1024)
    repo = Repository.open(str(tmp_path / "r"))
    sid = _begin(repo)
    repo.append(*sid, [(_oid(i), 0, os.urandom(20_000)) for i in range(10)])
    repo.end_session(sid[0])
    repo.wait_for_parity()
    names = [name for _, name, sealed in repo.index.packs() if sealed]
    assert len(names) >= 3
    total = sum(len(packs.read_footer(os.path.join(repo.root, n))) for n in names)
    assert total == 10
    repo.close()


def test_one_server_per_directory(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    with pytest.raises(RepositoryError, match="in use by another"):
        Repository.open(str(tmp_path / "r"))
    repo.close()


def test_damaged_index_is_refused_with_rebuild_hint(tmp_path):
    root = str(tmp_path / "r")
    Repository.open(root).close()
    with open(os.path.join(root, "index.sqlite"), "wb") as handle:
        handle.write(b"this is not sqlite" * 100)
    with pytest.raises(RepositoryError, match="rebuild-index"):
        Repository.open(root)


def test_hostile_snapshot_ids_and_sessions(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    sid = _begin(repo)
    for bad in ("../config", "a" * 17, "", "ABCDEF0123456789"):
        with pytest.raises(UsageError):
            repo.commit_snapshot(sid[0], bad, b"record", 0)
    with pytest.raises(NotFoundError):
        repo.session("no-such-session", 1, b"", auth.OP_UPLOAD, b"")
    with pytest.raises(NotFoundError):
        repo.delete_snapshot("../../etc", b"", b"")
    repo.close()


def test_retried_commit_is_idempotent(tmp_path):
    repo = Repository.open(str(tmp_path / "r"))
    first = _begin(repo)
    repo.append(*first, [(_oid(1), 0, b"data")])
    repo.sync(*first)
    assert repo.commit_snapshot(first[0], "0123456789abcdef", b"record", 0) == "0123456789abcdef"
    retry = _begin(repo)  # the reply was lost; the client retries in a new session
    assert repo.commit_snapshot(retry[0], "0123456789abcdef", b"record", 0) == "0123456789abcdef"
    other = _begin(repo)
    with pytest.raises(UsageError, match="already exists"):
        repo.commit_snapshot(other[0], "0123456789abcdef", b"another record", 0)
    assert [i.snapshot_id for i in repo.snapshots()] == ["0123456789abcdef"]
    repo.close()


def test_an_idle_session_stops_holding_back_sweeps(tmp_path, monkeypatch):
    from pysrbup.server import sessions

    repo = Repository.open(str(tmp_path / "r"))
    writer = _begin(repo)
    repo.append(*writer, [(_oid(1), 0, b"garbage soon")])
    repo.sync(*writer)
    stale = _begin(repo)  # a client that began a backup and died
    repo.index.condemn([_oid(1)], watermark=2)
    repo.end_session(writer[0])
    assert _has(repo, _oid(1))  # the stale session might still rely on it
    monkeypatch.setattr(sessions, "SESSION_IDLE_SECONDS", 0)
    repo.collect_garbage()
    assert not _has(repo, _oid(1))
    with pytest.raises(NotFoundError):
        repo.sync(*stale)
    repo.close()


def test_snapshot_files_have_their_own_format_and_damage_is_skipped(tmp_path):
    from pysrbup.server import snapshot_store

    repo = Repository.open(str(tmp_path / "r"))
    writer = _begin(repo)
    repo.commit_snapshot(writer[0], "0123456789abcdef", b"sealed record", 0)
    path = os.path.join(repo.root, "snapshots", "0123456789abcdef")
    with open(path, "rb") as handle:
        raw = handle.read()
    assert raw.startswith(b"PSRBSNAP") and raw.endswith(b"sealed record")
    assert snapshot_store.decode("0123456789abcdef", raw).record == b"sealed record"
    with open(os.path.join(repo.root, "snapshots", "fedcba9876543210"), "wb") as handle:
        handle.write(b"not a record")
    assert [s.snapshot_id for s in repo.snapshots()] == ["0123456789abcdef"]
    repo.close()
