"""The repository on both stores, end to end: the local directory and S3 on a real SeaweedFS.

Backup, restore, delete with garbage collection, parity repair, scrub,
concurrent clients and kill -9 of the server run against both; the
disaster test wipes the server's local directory and restores from the
bucket alone. Crashes at every store operation use the fault-injecting
store in-process.
"""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
from faultstore import Crash, FaultyStore
from helpers import (
    ServerProcess,
    assert_no_traceback,
    backup_id_in,
    base_env,
    free_port,
    server_cli,
)
from seaweed import ACCESS_KEY, s3_env, s3_or_skip
from trees import random_bytes, snapshot_tree

from pysrbup.errors import RepositoryError, StorageFullError
from pysrbup.server import blobstore, ecc
from pysrbup.server.blobstore import BlobStore, LocalStore, S3Location, S3Store
from pysrbup.server.storage import Repository


class Backend:
    """One store a test server runs on, and a handle on it for the test to look inside."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        if kind == "local":
            self.flags: tuple[str, ...] = ()
            self.env: dict[str, str] = {}
            self.store: BlobStore = LocalStore(str(tmp_path / "repo"))
        else:
            weed = s3_or_skip()
            bucket = weed.new_bucket()
            self.url = f"s3://{bucket}/backups"
            self.flags = (f"--storage={self.url}",)
            self.env = weed.env()
            self.store = S3Store(
                S3Location(
                    bucket,
                    "backups",
                    endpoint=weed.endpoint,
                    access_key=ACCESS_KEY,
                    secret_key=weed.env()["AWS_SECRET_ACCESS_KEY"],
                )
            )

    def pack_names(self) -> list[str]:
        return sorted(n for n, _ in self.store.list("packs") if n.endswith(".pack"))

    def pack_bytes(self) -> int:
        return sum(s for n, s in self.store.list("packs") if n.endswith(".pack"))

    def wait_for_parity(self, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = dict(self.store.list("packs"))
            found = sorted(n for n in names if n.endswith(".pack"))
            if found and all(blobstore.parity_name(n) in names for n in found):
                return found
            time.sleep(0.1)
        raise AssertionError("parity was not written")

    def flip(self, name: str, offsets: list[int]) -> None:
        """Damages an object in the store behind the server's back (in place, as rot does)."""
        data = bytearray(self.store.get(name))
        for offset in offsets:
            data[offset] ^= 0xA5
        if isinstance(self.store, LocalStore):
            with open(self.store.path(name), "r+b") as handle:
                handle.write(data)
        else:
            self.store.put(name, bytes(data))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    return Backend(request.param, tmp_path)


def _server(tmp_path, backend: Backend, cache_dir: str, repo: str = "repo") -> ServerProcess:
    env = dict(base_env(cache_dir), **backend.env)
    srv = ServerProcess(
        repo=str(tmp_path / repo),
        port=free_port(),
        env=env,
        log_path=str(tmp_path / f"{repo}.log"),
        extra=backend.flags,
    )
    srv.start()
    return srv


@pytest.fixture
def served(tmp_path, backend, cache_dir):
    srv = _server(tmp_path, backend, cache_dir)
    yield srv
    srv.stop()


def _tree(root, seed: int, files: int = 3, size: int = 2 * 1024 * 1024):
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.bin").write_bytes(random_bytes(size, seed + i))
    (root / "notes.txt").write_text(f"notes {seed}\n" * 1000)
    return root


def test_backup_restore_delete_and_collect(tmp_path, backend, served, cache_dir, key_file):
    client = served.client(cache_dir)
    first = _tree(tmp_path / "one", 1)
    second = _tree(tmp_path / "two", 100)
    first_id = client.backup(str(first), key_file)
    second_id = client.backup(str(second), key_file)
    assert backend.pack_names(), "packs are in the store"
    before = backend.pack_bytes()
    client.run("restore", first_id, str(tmp_path / "out1"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out1" / "one")) == snapshot_tree(str(first))
    client.run("delete", first_id, key_file, check=True)
    after = backend.pack_bytes()
    assert after < before * 0.7, (before, after)
    client.run("restore", second_id, str(tmp_path / "out2"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out2" / "two")) == snapshot_tree(str(second))
    if backend.kind == "s3":
        assert not os.path.exists(os.path.join(served.repo, "packs"))  # nothing stored locally
        assert os.listdir(os.path.join(served.repo, "staging")) == []


def test_parity_repairs_and_scrub(tmp_path, backend, served, cache_dir, key_file):
    client = served.client(cache_dir)
    src = _tree(tmp_path / "src", 7)
    backup_id = client.backup(str(src), key_file)
    name = backend.wait_for_parity()[0]
    size = backend.store.stat(name)
    backend.flip(name, random.Random(3).sample(range(size), 6))
    proc = client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert_no_traceback(proc)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    assert "repaired" in served.log()
    served.stop()
    backend.flip(name, [1000, 2000])
    scrub = server_cli("--scrub", *backend.flags, served.repo, env=served.env)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    assert "0 unrepairable" in scrub.stdout and " 0 repaired" not in scrub.stdout
    again = server_cli("--scrub", *backend.flags, served.repo, env=served.env)
    assert " 0 repaired, 0 unrepairable" in again.stdout


def test_concurrent_clients_and_kill_9(tmp_path, backend, served, cache_dir, key_file):
    client = served.client(cache_dir)
    client.env = dict(client.env, PYSRBUP_RETRY_SECONDS="3")
    sources = [_tree(tmp_path / f"c{i}", 10 * i, files=2) for i in range(3)]
    procs = [client.spawn("backup", str(src), key_file) for src in sources[:1]]
    procs[0].communicate(timeout=120)  # the first one initialises the repository
    procs = [client.spawn("backup", str(src), key_file) for src in sources]
    done = {}
    for src, proc in zip(sources, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        done[backup_id_in(out)] = src
    big = _tree(tmp_path / "big", 500, files=4, size=6 * 1024 * 1024)
    proc = client.spawn("backup", str(big), key_file)
    time.sleep(1.5)
    served.kill()
    proc.communicate(timeout=120)
    served.start()  # the same local directory: the server takes its own stale lock back
    done[client.backup(str(big), key_file)] = big
    for backup_id, src in done.items():
        out = tmp_path / f"out-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        assert snapshot_tree(str(out / src.name)) == snapshot_tree(str(src))
    served.stop()
    scrub = server_cli("--scrub", *backend.flags, served.repo, env=served.env)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr


def test_disaster_new_server_on_the_bucket_restores_everything(tmp_path, cache_dir, key_file):
    backend = Backend("s3", tmp_path)
    srv = _server(tmp_path, backend, cache_dir)
    try:
        client = srv.client(cache_dir)
        src = _tree(tmp_path / "src", 42)
        backup_id = client.backup(str(src), key_file)
        doomed = client.backup(str(_tree(tmp_path / "doomed", 77, files=1)), key_file)
        client.run("delete", doomed, key_file, check=True)
    finally:
        srv.stop()
    shutil.rmtree(srv.repo)  # the server's disk is gone

    fresh_cache = str(tmp_path / "cache2")
    os.makedirs(fresh_cache)
    new = _server(tmp_path, backend, fresh_cache, repo="new-local")
    try:
        assert "rebuilding it from" in new.log()
        client2 = new.client(fresh_cache)
        listed = client2.run("list", "--key-file", key_file, check=True).stdout
        assert backup_id in listed and doomed not in listed
        client2.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
        assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
        client2.run("check", "--read-data", "--key-file", key_file, check=True)
        client2.backup(str(src), key_file)  # and it goes on taking backups
    finally:
        new.stop()


def test_a_second_server_on_one_bucket_is_refused(tmp_path, cache_dir):
    backend = Backend("s3", tmp_path)
    first = _server(tmp_path, backend, cache_dir)
    try:
        refused = server_cli(
            f"--bind-to=127.0.0.1:{free_port()}",
            *backend.flags,
            str(tmp_path / "other-local"),
            env=first.env,
        )
        assert refused.returncode != 0
        assert "in use by another pysrbup-server" in refused.stderr
        assert "--break-lock" in refused.stderr
        assert_no_traceback(refused)
    finally:
        first.stop()
    second = _server(tmp_path, backend, cache_dir, repo="other-local")  # a clean stop unlocks
    second.stop()


def test_unreachable_or_missing_bucket_is_one_line(tmp_path, cache_dir):
    s3_or_skip()
    backend = Backend("s3", tmp_path)
    env = dict(base_env(cache_dir), **backend.env)
    cases = [
        ("--storage=s3://no-such-bucket-x/p", {}, "does not exist"),
        (backend.flags[0], {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
        (backend.flags[0], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach"),
    ]
    for flag, extra, message in cases:
        proc = server_cli(flag, str(tmp_path / "l"), env=dict(env, **extra))
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert_no_traceback(proc)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- crashes at every store operation, in-process ---------------------------------


def _drive(repo: Repository, rounds: int, seed: int) -> dict[str, list[bytes]]:
    """Backs up ``rounds`` sets of objects through the storage API; committed ids -> objects."""
    from test_storage import _begin, _oid

    committed = {}
    rng = random.Random(seed)
    for r in range(rounds):
        session, stream = _begin(repo)
        repo.put_session_key(session, bytes([seed, r]) * 8, b"wrapped" * 8)
        batch = [(_oid(1000 * seed + 10 * r + i), 0, rng.randbytes(30_000)) for i in range(3)]
        repo.append(session, stream, batch)
        repo.sync(session, stream)
        snapshot_id = f"{seed:08x}{r:08x}"
        repo.commit_snapshot(session, snapshot_id, b"record" + bytes([r]), 1 << 62)
        committed[snapshot_id] = [oid for oid, _, _ in batch]
        repo.wait_for_parity()
    return committed


def _crash(repo: Repository) -> None:
    """Drops the repository like a killed process would: no sealing, no clean close."""
    for session in repo._sessions.values():
        if session.writer is not None:
            session.writer.abandon()
    repo.index.close()
    if repo._lock_fd >= 0:
        os.close(repo._lock_fd)
        repo._lock_fd = -1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_crash_at_every_store_operation_loses_nothing_committed(tmp_path, kind):
    if kind == "local":
        local = str(tmp_path / "store")
        inner = LocalStore(local)
    else:
        inner = Backend("s3", tmp_path).store
        local = str(tmp_path / "local")
    level = ecc.EccLevel(4, 2)
    repo = Repository.open(local, store=FaultyStore(inner), ecc_level=level)
    every = _drive(repo, 1, 0)  # an initialised repository with one backup
    repo.close()
    crash_at, finished = 0, False
    while not finished:
        faulty = FaultyStore(inner, crash_after=crash_at)
        repo = None
        try:
            repo = Repository.open(local, store=faulty, ecc_level=level)
            every.update(_drive(repo, 2, 1 + crash_at))
            repo.close()
            finished = True
        except Crash:
            if repo is not None:
                _crash(repo)
        time.sleep(0.05)  # daemon threads that met the crash are gone
        reopened = Repository.open(local, store=inner, ecc_level=level)
        try:
            stored = set(reopened.snapshot_ids())
            for snapshot_id, oids in list(every.items()):
                if snapshot_id not in stored:  # never acknowledged: the crash came first
                    del every[snapshot_id]
                    continue
                fetched = {oid: status for oid, status, _ in reopened.fetch(oids)}
                assert set(fetched.values()) == {0}, (crash_at, snapshot_id, faulty.done[-3:])
            assert not reopened.scrub().damaged
            assert os.listdir(os.path.join(local, "staging")) == []
        finally:
            reopened.close()
        crash_at += 1
        assert crash_at < 200
    assert crash_at > 5 and len(every) >= 3


def test_full_store_fails_the_upload_not_the_server(tmp_path):
    from test_storage import _begin, _oid

    inner = LocalStore(str(tmp_path / "r"))
    full = {"on": False}
    store = FaultyStore(inner, full=lambda name: full["on"] and name.startswith("packs/"))
    repo = Repository.open(str(tmp_path / "r"), store=store)
    session, stream = _begin(repo)
    repo.append(session, stream, [(_oid(1), 0, b"x" * 1000)])
    repo.sync(session, stream)
    full["on"] = True
    with pytest.raises(StorageFullError):
        repo.commit_snapshot(session, "00000000000000aa", b"record", 1 << 62)
    assert repo.snapshot_ids() == []  # no record refers to a pack that is not stored
    full["on"] = False
    retry, _ = _begin(repo)
    repo.commit_snapshot(retry, "00000000000000aa", b"record", 1 << 62)
    assert repo.snapshot_ids() == ["00000000000000aa"]
    assert repo.has_objects([_oid(1)]) == b"\x01"
    repo.close()


def test_lock_object_is_taken_back_only_by_its_own_directory(tmp_path):
    backend = Backend("s3", tmp_path)
    with s3_env(s3_or_skip()):
        first = Repository.open(str(tmp_path / "a"), store=backend.store)
        first.index.close()
        os.close(first._lock_fd)  # killed: the lock object stays
        with pytest.raises(RepositoryError, match="in use by another"):
            Repository.open(str(tmp_path / "b"), store=backend.store)
        again = Repository.open(str(tmp_path / "a"), store=backend.store)  # its own: stale
        again.close()
        assert backend.store.stat(blobstore.LOCK) is None
        first = Repository.open(str(tmp_path / "a"), store=backend.store)
        first.index.close()
        os.close(first._lock_fd)
        taken = Repository.open(str(tmp_path / "b"), store=backend.store, break_lock=True)
        taken.close()


def test_fetch_reads_neighbours_with_one_request(tmp_path):
    from test_storage import _begin, _oid

    backend = Backend("s3", tmp_path)
    repo = Repository.open(str(tmp_path / "l"), store=backend.store, ecc_level=None)
    session, stream = _begin(repo)
    payloads = {_oid(i): os.urandom(10_000) for i in range(50)}
    repo.append(session, stream, [(oid, 0, p) for oid, p in payloads.items()])
    repo.commit_snapshot(session, "00000000000000bb", b"r", 1 << 62)
    before = repo.store.stats.snapshot()
    got = {oid: bytes(p) for oid, status, p in repo.fetch(list(payloads)) if status == 0}
    assert got == payloads
    after = repo.store.stats.snapshot()
    assert after["requests_get"] - before.get("requests_get", 0) == 1  # 50 objects, one ranged read
    assert after["bytes_received"] - before["bytes_received"] < 50 * (10_000 + 100)
    repo.close()
