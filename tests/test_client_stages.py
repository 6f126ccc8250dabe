"""Client stages one at a time against a real in-process server: uploader, id cache."""

from __future__ import annotations

import itertools
import os
import threading

import pytest
from inprocess import in_process_server

from pysrbup.client import uploader as uploader_mod
from pysrbup.client.idcache import IdCache
from pysrbup.client.session import SessionHolder
from pysrbup.client.uploader import Uploader


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSRBUP_CACHE_DIR", str(tmp_path / "cache"))
    with in_process_server(str(tmp_path / "repo")) as served:
        yield served


def _objects(count: int, size: int = 10_000) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(32), os.urandom(size)) for _ in range(count)]


def test_uploader_reports_each_frame_durable_once(served):
    durable: list[bytes] = []
    lock = threading.Lock()

    def on_durable(oids):
        with lock:
            durable.extend(oids)

    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions, on_durable=on_durable)
    objects = _objects(900)  # several frames
    for oid, envelope in objects:
        up.put(oid, envelope)
    stats = up.finish()
    assert stats.objects_stored == len(objects) and stats.retries == 0
    assert sorted(durable) == sorted(oid for oid, _ in objects)
    assert served.remote.missing_objects([oid for oid, _ in objects]) == []


def test_uploader_renews_a_session_the_server_forgot(served):
    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions, retry_seconds=20)
    first = _objects(10)
    for oid, envelope in first:
        up.put(oid, envelope)
    up.flush()
    old = sessions.current
    deadline = 200
    while served.remote.missing_objects([first[-1][0]]) and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    served.storage.end_session(served.storage._sessions[old.session_id])  # a server restart
    later = _objects(10)
    for oid, envelope in later:
        up.put(oid, envelope)
    stats = up.finish()
    assert sessions.current is not old and sessions.renewals == 1
    assert stats.new_sessions == 1
    assert served.remote.missing_objects([oid for oid, _ in first + later]) == []


def test_uploader_ends_idle_streams_and_opens_new_ones(served, monkeypatch):
    monkeypatch.setattr(uploader_mod, "IDLE_STREAM_SECONDS", 0.3)
    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions)
    batches = [_objects(3), _objects(3)]
    up.put(*batches[0][0])
    for oid, envelope in batches[0][1:]:
        up.put(oid, envelope)
    up.flush()
    threading.Event().wait(1.5)  # the stream has gone idle and ended cleanly
    for oid, envelope in batches[1]:
        up.put(oid, envelope)
    stats = up.finish()
    assert stats.retries == 0 and stats.objects_stored == 6


def test_id_cache_follows_the_log_and_survives_a_torn_file(served):
    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions)
    objects = _objects(40, 100)
    for oid, envelope in objects:
        up.put(oid, envelope)
    up.finish()
    repo_id = served.remote.repo_id
    cache = IdCache(repo_id)
    assert cache.sync(served.remote.conn) == []
    assert all(oid in cache.ids for oid, _ in objects) and len(cache.ids) == 40
    # A crash after appending ids but before saving the state leaves extra bytes.
    with open(cache._ids_path, "ab") as handle:
        handle.write(os.urandom(32 * 3 + 5))
    again = IdCache(repo_id)
    again.sync(served.remote.conn)
    assert again.ids == cache.ids and again.last_seq == cache.last_seq
    # Ids the server lists but does not hold are forgotten on request.
    gone = [objects[0][0]]
    again.discard(gone)
    fresh = IdCache(repo_id)
    fresh.sync(served.remote.conn)
    assert objects[0][0] not in fresh.ids and objects[1][0] in fresh.ids


def test_id_cache_drops_condemned_ids_until_they_are_stored_again(served):
    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions)
    objects = _objects(30, 100)
    for oid, envelope in objects:
        up.put(oid, envelope)
    up.finish()
    cache = IdCache(served.remote.repo_id)
    cache.sync(served.remote.conn)
    doomed = [oid for oid, _ in objects[:10]]
    served.remote.condemn(doomed, [])
    assert sorted(cache.sync(served.remote.conn)) == sorted(doomed)
    assert not any(oid in cache.ids for oid in doomed) and len(cache.ids) == 20
    again = Uploader(served.remote.conn, SessionHolder(served.remote.begin_session))
    for oid, envelope in objects[:3]:  # stored again: logged as added after the condemn
        again.put(oid, envelope)
    again.finish()
    later = IdCache(served.remote.repo_id)
    later.sync(served.remote.conn)
    assert [oid in later.ids for oid in doomed] == [True] * 3 + [False] * 7
    assert len(later.ids) == 23
    with open(later._ids_path, "rb") as handle:
        assert len(handle.read()) == 23 * 32  # the file holds the set, nothing more


def test_id_cache_reports_condemnations_another_process_read_first(served):
    """The cache folder is shared: a sync reports what was condemned since its own last sync."""
    sessions = SessionHolder(served.remote.begin_session)
    up = Uploader(served.remote.conn, sessions)
    objects = _objects(6, 100)
    for oid, envelope in objects:
        up.put(oid, envelope)
    up.finish()
    repo_id = served.remote.repo_id
    backup = IdCache(repo_id)  # a running backup's view
    backup.sync(served.remote.conn)
    doomed = sorted(oid for oid, _ in objects[:3])
    assert served.remote.condemn(doomed, []).condemned == 3  # held: the session is open
    other = IdCache(repo_id)  # another client of this machine, the same folder
    assert sorted(other.sync(served.remote.conn)) == doomed
    assert sorted(backup.sync(served.remote.conn)) == doomed
    assert backup.ids == other.ids and not any(oid in backup.ids for oid in doomed)
    assert backup.sync(served.remote.conn) == []
    served.remote.end_session(sessions.current)


def test_id_cache_restarts_when_the_index_epoch_changes(served):
    up = Uploader(served.remote.conn, SessionHolder(served.remote.begin_session))
    for oid, envelope in _objects(5, 100):
        up.put(oid, envelope)
    up.finish()
    repo_id = served.remote.repo_id
    cache = IdCache(repo_id)
    cache.sync(served.remote.conn)
    with open(cache._state_path) as handle:
        state = handle.read()
    with open(cache._state_path, "w") as handle:
        handle.write(state.replace(f'"epoch": {cache.epoch}', '"epoch": 12345'))
    stale = os.urandom(32)  # an id known "before the index was rebuilt"
    with open(cache._ids_path, "r+b") as handle:
        handle.write(stale)
    fresh = IdCache(repo_id)
    fresh.sync(served.remote.conn)
    assert fresh.epoch == cache.epoch and stale not in fresh.ids
    assert len(fresh.ids) == len(cache.ids) > 0


def test_restore_plans_each_chunk_once_at_every_offset(served, tmp_path):
    """Restore planning: one fetch per distinct chunk, written wherever files need it."""
    from trees import random_bytes, snapshot_tree

    from pysrbup.client.backup import Backup
    from pysrbup.client.restore import Restore

    src = tmp_path / "src"
    src.mkdir()
    big = random_bytes(9 * 1024 * 1024, 5)  # several chunks
    (src / "a.bin").write_bytes(big)
    (src / "b.bin").write_bytes(big)  # the same chunks again
    (src / "small.txt").write_text("one chunk\n")
    (src / "empty").write_bytes(b"")
    backup_id = Backup(served.remote, 2).run(str(src)).backup_id
    job = Restore(served.remote, 2)
    job.run(backup_id, str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    places = job.planned()
    per_file: dict[str, list[tuple[int, int]]] = {}
    for plan in places.values():
        for path, offset, size in plan:
            per_file.setdefault(os.path.basename(path), []).append((offset, size))
    for name in ("a.bin", "b.bin"):
        spans = sorted(per_file[name])
        assert len(spans) > 1 and spans[0][0] == 0
        assert all(o1 + s1 == o2 for (o1, s1), (o2, _) in itertools.pairwise(spans))
        assert spans[-1][0] + spans[-1][1] == len(big)
    assert per_file["small.txt"] == [(-1, len("one chunk\n"))]  # created when its data comes
    assert "empty" not in per_file  # nothing to fetch
    shared = [plan for plan in places.values() if len(plan) == 2]
    assert len(shared) == len(per_file["a.bin"])  # each chunk of the pair fetched once
