"""The server's repository: a thin facade over layers that each do one job.

Everything here works on ciphertext only; the server holds no key. The
layers (docs/design.md §8):

- ``blobstore``: where objects live (a local directory or an S3 bucket), the source of truth;
- ``records``: config, session keys, snapshot records and deletion markers in the store;
- ``packstore``: packs staged on the local disk while written, uploaded whole when sealed;
- ``sessions``: writing sessions and their uploads; ``challenges``: single-use challenges;
- ``gc``: sweeping and compaction; ``parity``: the ``ecc`` codec over pack objects;
- ``index``: the SQLite index on the local disk, a cache rebuilt from the store when lost.

The local directory holds what is this server's own: ``lock`` (flock'ed),
``index.sqlite``, ``staging/``, ``init-token`` and ``tls/``. With the
local store (the default) it is also the store, in the layout the server
always had.

Writes are acknowledged only once durable: a staged pack is fsynced before
its index rows commit (upload acknowledgement); a snapshot record is stored
only once every pack holding a synced object is in the store.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from operator import itemgetter

from pysrbup.errors import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RepositoryError,
    UsageError,
)
from pysrbup.repo import auth, wire
from pysrbup.server import blobstore, ecc, packs, snapshot_store
from pysrbup.server.blobstore import BlobNotFoundError, BlobStore, LocalStore
from pysrbup.server.challenges import Challenges
from pysrbup.server.gc import Collector
from pysrbup.server.index import Index
from pysrbup.server.packstore import PackStore
from pysrbup.server.parity import Parity, ScrubReport
from pysrbup.server.rebuild import flock, index_store, rebuild_index
from pysrbup.server.records import SNAPSHOT_ID, Records, new_config
from pysrbup.server.sessions import Session, Sessions, UploadCounts

__all__ = ["Counters", "Repository", "ScrubReport", "Session", "UploadCounts", "rebuild_index"]

INIT_TOKEN = "init-token"
INDEX = "index.sqlite"
log = logging.getLogger("pysrbup.server")
#: Fetches read neighbouring records of a pack with one ranged read up to this size.
READ_SPAN = 4 * 1024 * 1024
#: ... when the gap between them is at most this.
READ_GAP = 64 * 1024


@dataclass
class Counters:
    """Running totals since the server started, read by the metrics (pysrbup/server/metrics.py).

    Always kept, cheaply: a few additions per sync, fetch frame, repair or
    scrub (per object only where a read failed), none per upload frame. It
    has its own leaf lock, as its callers hold per-session locks (or none).
    """

    upload_bytes: int = 0
    fetch_bytes: int = 0
    objects_added: int = 0
    object_bytes_added: int = 0
    sessions_started: int = 0
    #: Packs verified (and repaired from parity) because a read failed.
    read_repairs: int = 0
    read_repaired_blocks: int = 0
    #: Objects served after such a repair, and those reported damaged anyway.
    read_repaired_objects: int = 0
    read_damaged_objects: int = 0
    scrubs: int = 0
    scrub_blocks_checked: int = 0
    scrub_blocks_repaired: int = 0
    scrub_blocks_unrepairable: int = 0
    scrub_damaged_objects: int = 0
    #: The last scrub: when it ended (Unix time, 0 before the first), what it found lost.
    last_scrub_time: float = 0.0
    last_scrub_blocks_unrepairable: int = 0
    last_scrub_damaged_objects: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        """Adds to the named counters."""
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def set(self, **values: float) -> None:
        """Sets the named values (the last scrub's)."""
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def snapshot(self) -> dict[str, float]:
        """Every value, consistently."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}


class Repository:
    """A pysrbup repository: its store, and this server's local directory.

    ``Repository.open(local_dir, store=...)`` opens one: locks, loads the
    config, recovers, sweeps (the default store is the directory itself).
    The constructor only records the settings; nothing is touched until
    ``open``.
    """

    def __init__(
        self,
        root: str,
        append_only: bool = False,
        create: bool = True,
        ecc_level: ecc.EccLevel | None = ecc.DEFAULT_LEVEL,
        store: BlobStore | None = None,
        break_lock: bool = False,
    ):
        self.root = os.path.abspath(root)
        self.append_only = append_only
        self.ecc_level = ecc_level
        self.store = store if store is not None else LocalStore(self.root)
        self.remote = self.store.local_root != self.root
        self.counters = Counters()
        self._create = create
        self._break_lock = break_lock
        self._lock_fd = -1
        self._store_locked = False

    @classmethod
    def open(
        cls,
        root: str,
        *,
        store: BlobStore | None = None,
        append_only: bool = False,
        create: bool = True,
        ecc_level: ecc.EccLevel | None = ecc.DEFAULT_LEVEL,
        break_lock: bool = False,
    ) -> Repository:
        """Opens the repository in ``store`` (default: the directory ``root`` itself)."""
        repo = cls(root, append_only, create, ecc_level, store, break_lock)
        repo._open()
        return repo

    # ---- opening and closing -----------------------------------------------------------

    def _open(self) -> None:
        if not os.path.isdir(self.root):
            if not self._create:
                raise RepositoryError(f"{self.root} is not a pysrbup repository")
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise RepositoryError(f"cannot create {self.root}: {exc.strerror}") from None
        self._lock_fd = flock(self.root, "in use by another pysrbup-server")
        try:
            if self.remote:
                self._lock_store()
            self._config_lock = threading.Lock()
            self.records = Records(self.store)
            self.config = self._load_config()
            if not self.initialised and not os.path.exists(self.init_token_path):
                self._write_init_token()  # e.g. removed by hand before anyone initialised
            index_path = os.path.join(self.root, INDEX)
            fresh = not os.path.exists(index_path)
            if fresh and self._store_has_packs():
                if not self.remote:
                    raise RepositoryError(
                        f"the index {index_path} is missing; run pysrbup-server --rebuild-index"
                    )
                log.warning("no local index: rebuilding it from %s", self.store.location)
            self.index = Index(index_path)
            if fresh and self.remote:
                index_store(self.store, self.index, self.records, verify=False)
            if isinstance(self.store, LocalStore):
                self.store.remove_temporaries()
                for folder in (blobstore.PACKS, blobstore.SNAPSHOTS, blobstore.KEYS):
                    os.makedirs(self.store.path(folder), exist_ok=True)
            self._pack_lock = threading.RLock()
            self.parity = Parity(self.store, self.ecc_level, self._pack_lock, self._pack_alive)
            self.packs = PackStore(
                self.store,
                self.root,
                self.index,
                on_uploaded=self.parity.queue,
                keep_data=self.ecc_level is not None and self.remote,
            )
            self.sessions = Sessions(self.index, self.packs, self.counters)
            self.challenges = Challenges()
            self.collector = Collector(
                self.index, self.packs, self.parity, self.sessions, self._pack_lock
            )
            self.packs.recover()
            self._finish_deletes()
            self.collector.collect(force=True)  # no session survives a restart: sweep all
            if self.ecc_level is not None:
                stored = {name for name, _ in self.store.list(blobstore.PACKS)}
                for _, name, sealed in self.index.packs():
                    if sealed and name in stored and blobstore.parity_name(name) not in stored:
                        self.parity.queue(name)
        except BaseException:
            self._release()
            raise

    def _store_has_packs(self) -> bool:
        return any(True for _ in self.store.list(blobstore.PACKS))

    def _lock_store(self) -> None:
        """Takes the lock object in the store: one server per bucket (docs/design.md §8.7)."""
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "local_dir": self.root,
            "since": time.time(),
        }
        data = json.dumps(owner).encode()
        if not self.store.put_new(blobstore.LOCK, data):
            try:
                held = json.loads(self.store.get(blobstore.LOCK))
            except (BlobNotFoundError, ValueError):
                held = {}
            mine = held.get("host") == owner["host"] and held.get("local_dir") == self.root
            # Same host and local directory: its holder is dead (we hold that directory's flock).
            if not (mine or self._break_lock):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
                raise RepositoryError(
                    f"{self.store.location} is in use by another pysrbup-server "
                    f"(host {held.get('host', '?')}, pid {held.get('pid', '?')}, "
                    f"directory {held.get('local_dir', '?')}, since {since}); if that server "
                    f"is gone for good, start this one with --break-lock"
                )
            self.store.put(blobstore.LOCK, data)
        self._store_locked = True

    def _release(self) -> None:
        try:
            if self._store_locked:
                self._store_locked = False
                with contextlib.suppress(Exception):
                    self.store.delete(blobstore.LOCK)
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _finish_deletes(self) -> None:
        """Completes deletes a crash interrupted (marker stored, record not yet removed)."""
        for snapshot_id in self.records.deleted_ids():
            if self.index.get_meta("deleted:" + snapshot_id) is None:
                self.index.set_meta("deleted:" + snapshot_id, b"1")
            self.records.delete_snapshot(snapshot_id)

    def _pack_alive(self, name: str) -> bool:
        return name in self.packs.names.values()

    def close(self) -> None:
        """Seals and uploads open packs, finishes parity, closes files, releases the locks."""
        self.sessions.close_all()
        self.packs.close()
        with contextlib.suppress(Exception):
            self.packs.flush()
        self.parity.close()
        self.index.close()
        self.store.close()
        self._release()

    @property
    def _sessions(self) -> dict[str, Session]:
        """The open sessions by id (tests end one behind the client's back)."""
        return self.sessions.by_id

    # ---- configuration -------------------------------------------------------------------

    def _load_config(self) -> dict:
        config = self.records.load_config()
        if config is not None:
            return config
        if self._store_has_packs():
            raise RepositoryError(
                f"{self.store.location}/config is missing but packs exist; refusing to start"
            )
        config = new_config()
        self._write_init_token()
        self.records.save_config(config)
        return config

    @property
    def repo_id(self) -> bytes:
        return bytes.fromhex(self.config["repo_id"])

    def _public_key(self, name: str) -> bytes:
        value = self.config.get(name)
        return bytes.fromhex(value) if value else b""

    @property
    def write_public_key(self) -> bytes:
        return self._public_key("write_public_key")

    @property
    def destroy_public_key(self) -> bytes:
        return self._public_key("destroy_public_key")

    @property
    def initialised(self) -> bool:
        return bool(self.write_public_key and self.destroy_public_key)

    @property
    def init_token_path(self) -> str:
        return os.path.join(self.root, INIT_TOKEN)

    def _write_init_token(self) -> None:
        token = os.urandom(24).hex()
        fd = os.open(self.init_token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def init_token(self) -> str:
        """The one-time init token ("" once the repository is initialised)."""
        if self.initialised:
            return ""
        try:
            with open(self.init_token_path, encoding="ascii") as handle:
                return handle.read(256).strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def initialise(
        self,
        token: bytes,
        write_public: bytes,
        destroy_public: bytes,
        write_sig: bytes,
        destroy_sig: bytes,
    ) -> None:
        """Fixes the write and destroy public keys, once, for the holder of the init token."""
        if len(write_public) != 32 or len(destroy_public) != 32:
            raise UsageError("a capability public key is 32 bytes")
        with self._config_lock:
            if self.initialised:
                raise PermissionDeniedError("the repository is already initialised")
            expected = self.init_token()
            if not expected or not hmac.compare_digest(token, expected.encode()):
                raise PermissionDeniedError(
                    f"wrong init token (it is in {self.init_token_path} on the server)"
                )
            message = auth.init_message(self.repo_id, token, write_public, destroy_public)
            auth.verify(write_public, write_sig, message, "write")
            auth.verify(destroy_public, destroy_sig, message, "destroy")
            config = dict(
                self.config,
                write_public_key=write_public.hex(),
                destroy_public_key=destroy_public.hex(),
            )
            self.records.save_config(config)
            self.config = config
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.init_token_path)

    def recover(self) -> None:
        """Seals and uploads packs a crash left staged (also run at every start)."""
        self.packs.recover()

    # ---- sessions and uploads --------------------------------------------------------------

    def begin_session(self, challenge: bytes, session_public: bytes, signature: bytes) -> str:
        """Opens a writing session for a write-key holder, bound to ``session_public``."""
        if len(session_public) != 32:
            raise UsageError("a session public key is 32 bytes")
        self.challenges.take(challenge)
        auth.verify(
            self.write_public_key,
            signature,
            auth.begin_message(self.repo_id, challenge, session_public),
            "write",
        )
        return self.sessions.begin(session_public).session_id

    @property
    def open_sessions(self) -> int:
        """Writing sessions open now (for the metrics)."""
        return len(self.sessions.by_id)

    def session(self, session_id: str, seq: int, signature: bytes, op: str, body: bytes) -> Session:
        """The session a request names, once its session proof verifies (each seq once)."""
        return self.sessions.verified(self.repo_id, session_id, seq, signature, op, body)

    def open_stream(self, session: Session) -> int:
        """Makes a new upload stream the session's only writer; returns its number."""
        return self.sessions.open_stream(session)

    def append(
        self, session: Session, stream: int, records: Iterable[tuple[bytes, int, memoryview]]
    ) -> UploadCounts:
        """Appends records (id, flags, envelope) to the session's pack; durable after ``sync``."""
        return self.sessions.append(session, stream, records)

    def sync(self, session: Session, stream: int, index: bool = True) -> None:
        """Makes everything the stream appended durable, and visible in the index if
        ``index`` (else in a later batch: ``Sessions.commit``)."""
        self.sessions.sync(session, stream, index)

    def rollback(self, session: Session, stream: int) -> None:
        """Drops what ``stream`` appended since its last sync (its upload failed); what
        it made durable is indexed."""
        self.sessions.rollback(session, stream)

    def put_session_key(self, session: Session, key_id: bytes, wrapped: bytes) -> None:
        """Stores a wrapped session key (write once) for a live session."""
        self.sessions.live(session)
        if len(key_id) != wire.KEY_ID_SIZE or not 0 < len(wrapped) <= wire.MAX_WRAPPED_KEY:
            raise UsageError("malformed session key")
        self.records.put_session_key(key_id, wrapped)

    def session_keys(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.records.session_keys()

    def end_session(self, session: Session) -> Session:
        """Seals the session's pack and forgets the session."""
        self.sessions.live(session)
        self.sessions.forget(session)
        self.collect_garbage()
        return session

    def committed_record(self, snapshot_id: str) -> bytes | None:
        """The stored record of ``snapshot_id``, if there is one (a retried commit)."""
        if not SNAPSHOT_ID.match(snapshot_id):
            return None
        try:
            return self.records.read_snapshot(snapshot_id).record
        except FileNotFoundError:
            return None

    def _make_durable(self, session: Session) -> None:
        """Puts every pack holding a synced object into the store (before a record refers to it).

        With the local store a staged pack is as durable as an uploaded one, so
        only the committing session's pack is sealed; with a remote store the
        other sessions' packs are sealed too, since this backup may reuse their
        objects and must survive the loss of this server's disk.
        """
        with session.lock:
            self.sessions.seal(session)
        if self.remote:
            for other in self.sessions.all():
                if other is not session:
                    with other.lock:
                        if other.writer is not None and other.writer.entries:
                            self.sessions.seal(other)
        self.packs.flush()

    def commit_snapshot(
        self, session: Session, snapshot_id: str, record: bytes, checked_seq: int
    ) -> str:
        """Ends the session and stores its snapshot record durably.

        Refused with ConflictError if anything was condemned after the id-log
        position ``checked_seq``: the client first revives what it relies on.
        A record under an id that was deleted is refused for good, so a
        deleted backup cannot be replayed.
        """
        if not SNAPSHOT_ID.match(snapshot_id):
            raise UsageError("malformed snapshot id")
        if not 0 < len(record) <= wire.MAX_SNAPSHOT_RECORD:
            raise UsageError("malformed snapshot record")
        if self.index.get_meta("deleted:" + snapshot_id) is not None:
            raise PermissionDeniedError(f"backup {snapshot_id} was deleted; it cannot come back")
        existing = self.committed_record(snapshot_id)
        if existing is not None:
            if existing == record:  # a retried commit whose reply was lost
                self.sessions.forget(session)
                return snapshot_id
            raise UsageError(f"snapshot {snapshot_id} already exists")
        self.sessions.live(session)
        self._make_durable(session)
        with self.collector.lock:
            if self.index.condemned_after(checked_seq):
                raise ConflictError("objects were condemned during the backup; sync and retry")
            stored = snapshot_store.StoredSnapshot(
                snapshot_id, time.time_ns(), session.stored_bytes, record
            )
            self.records.write_snapshot(stored)
        self.sessions.forget(session)
        self.collect_garbage()
        return snapshot_id

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        """The ids of every stored snapshot record."""
        return self.records.snapshot_ids()

    def snapshots(self) -> list[snapshot_store.StoredSnapshot]:
        """Every snapshot record, oldest first (a damaged file is logged and skipped)."""
        return self.records.snapshots()

    def new_challenge(self) -> bytes:
        """A single-use challenge for BeginSession or a destructive request."""
        return self.challenges.new()

    def _check_destroy(self, challenge: bytes, signature: bytes, message: bytes) -> None:
        self.challenges.check_destroy(
            self.append_only, self.destroy_public_key, challenge, signature, message
        )

    def delete_snapshot(self, snapshot_id: str, challenge: bytes, signature: bytes) -> bool:
        """Removes a snapshot record after checking the key holder's proof.

        Returns True if it had already been deleted (a rerun after an
        interrupted delete), so the client can finish collecting garbage.
        """
        if not SNAPSHOT_ID.match(snapshot_id):
            raise NotFoundError(f"no backup {snapshot_id!r}")
        self._check_destroy(
            challenge, signature, auth.delete_message(self.repo_id, challenge, snapshot_id)
        )
        with self.collector.lock:
            if not self.records.delete_snapshot(snapshot_id):
                if self.index.get_meta("deleted:" + snapshot_id) is not None:
                    return True
                raise NotFoundError(f"no backup {snapshot_id}") from None
            self.index.set_meta("deleted:" + snapshot_id, b"1")
        return False

    # ---- garbage collection --------------------------------------------------------------

    def condemn(
        self, oids: list[bytes], snapshot_set: bytes, challenge: bytes, signature: bytes
    ) -> tuple[int, int, int]:
        """Condemns unreferenced objects; returns (count, bytes freed now, bytes pending).

        Refused with ConflictError when the snapshots the client computed the
        live set from (``snapshot_set``, signed) are not the ones stored now.
        """
        blob = b"".join(oids)
        message = auth.condemn_message(self.repo_id, challenge, snapshot_set, blob)
        self._check_destroy(challenge, signature, message)
        with self.collector.lock:
            if snapshot_set != auth.snapshot_set_digest(self.snapshot_ids()):
                raise ConflictError(
                    "the backups stored differ from the ones the client saw; list them again"
                )
            with self.sessions.lock:
                watermark = self.sessions.counter
            count, _ = self.index.condemn(oids, watermark)
        freed = self.collect_garbage(force=True)
        return count, freed, self.index.pending_condemned_bytes()

    def revive(self, session: Session, oids: list[bytes]) -> list[bytes]:
        """Takes condemned objects a session relies on back; returns those already gone."""
        self.sessions.live(session)
        with self.collector.lock:
            return self.index.revive(oids)

    def collect_garbage(self, force: bool = False) -> int:
        """Sweeps condemned objects no session relies on and compacts packs; bytes freed."""
        return self.collector.collect(force)

    # ---- error correction ------------------------------------------------------------------

    def wait_for_parity(self) -> None:
        """Blocks until every sealed pack is uploaded and its sidecar written (tests, scrub)."""
        self.packs.flush()
        self.parity.wait()

    def _repair(self, pack: int) -> bool:
        """Verifies and repairs a pack after a failed read; True if it is now whole."""
        name = self.packs.names.get(pack, "")
        if pack in self.packs.staged or not name:
            return False
        with self._pack_lock:
            try:
                result = self.parity.check(name)
            except FileNotFoundError:
                log.error("pack %s is missing: its objects are lost", name)
                return False
        self.counters.add(read_repairs=1, read_repaired_blocks=result.blocks_repaired)
        if result.blocks_repaired:
            log.warning("repaired %d damaged block(s) of %s", result.blocks_repaired, name)
        return not result.unprotected and not result.blocks_unrepairable

    def scrub(self) -> ScrubReport:
        """Verifies every sealed pack (and its parity) and repairs what parity allows."""
        report = self.parity.scrub(self.index)
        damaged = sum(len(ids) for ids in report.damaged.values())
        self.counters.add(
            scrubs=1,
            scrub_blocks_checked=report.blocks_checked,
            scrub_blocks_repaired=report.blocks_repaired,
            scrub_blocks_unrepairable=report.blocks_unrepairable,
            scrub_damaged_objects=damaged,
        )
        self.counters.set(
            last_scrub_time=time.time(),
            last_scrub_blocks_unrepairable=report.blocks_unrepairable,
            last_scrub_damaged_objects=damaged,
        )
        return report

    # ---- reads -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts and bytes of what the repository holds in its store."""
        objects, object_bytes, condemned, condemned_bytes = self.index.totals()
        stored = dict(self.store.list(blobstore.PACKS))
        pack_bytes = parity_bytes = count = 0
        for _, name, _ in self.index.packs():
            if name in stored:
                pack_bytes += stored[name]
                count += 1
            parity_bytes += stored.get(blobstore.parity_name(name), 0)
        return {
            "objects": objects,
            "object_bytes": object_bytes,
            "packs": count,
            "pack_bytes": pack_bytes,
            "parity_bytes": parity_bytes,
            "condemned_objects": condemned,
            "condemned_bytes": condemned_bytes,
        }

    def has_objects(self, oids: list[bytes]) -> bytes:
        """One byte per id: 1 if the repository stores it (its pack exists), else 0."""
        found = self.index.lookup_many(oids)
        exists: dict[int, bool] = {}
        for pack, _, _ in found.values():
            if pack not in exists:
                exists[pack] = self.packs.exists(pack)
        return bytes(1 if oid in found and exists[found[oid][0]] else 0 for oid in oids)

    def fetch(self, oids: list[bytes]) -> Iterator[tuple[bytes, int, memoryview | bytes]]:
        """Yields (id, ``wire.FETCH_*`` status, envelope) in pack order.

        Neighbouring records of one pack are read with one ranged read (up to
        ``READ_SPAN`` bytes), so a restore from a remote store makes few requests.
        """
        found = self.index.lookup_many(oids)
        for oid in oids:
            if oid not in found:
                yield oid, wire.FETCH_MISSING, b""
        order = sorted(found.items(), key=itemgetter(1))
        repaired: dict[int, bool] = {}
        head = packs.RECORD.size
        unpack = packs.RECORD.unpack_from
        checksum = packs.checksum
        for run in _runs(order):
            pack = run[0][1][0]
            start = run[0][1][1] - head
            end = run[-1][1][1] + run[-1][1][2]
            try:
                span = memoryview(self.packs.read(pack, start, end - start))
            except (OSError, RepositoryError):
                span = memoryview(b"")
            got = len(span)
            for oid, where in run:
                # packs.check_record, inlined: this loop runs once per object served.
                _, offset, length = where
                lo = offset - start
                payload = None
                if lo + length <= got:
                    stored_oid, stored_len, digest = unpack(span, lo - head)
                    if stored_oid == oid and stored_len == length:
                        payload = span[lo : lo + length]
                        if checksum(payload) != digest:
                            payload = None
                if payload is None:
                    payload = self._read_again(oid, where, repaired)
                if payload is None:
                    self.counters.add(read_damaged_objects=1)
                    yield oid, wire.FETCH_DAMAGED, b""
                else:
                    yield oid, wire.FETCH_FOUND, payload

    def _read_again(self, oid: bytes, where: tuple[int, int, int], repaired: dict[int, bool]):
        payload = None
        again = self.index.lookup_many([oid]).get(oid)  # compaction may have just moved it
        if again and again != where:
            payload = self._read(oid, *again)
        if payload is None:  # bit rot: rebuild the pack from parity, once per request
            if where[0] not in repaired:
                repaired[where[0]] = self._repair(where[0])
            if repaired[where[0]]:
                payload = self._read(oid, *where)
            if payload is not None:
                self.counters.add(read_repaired_objects=1)
        return payload

    def _read(self, oid: bytes, pack: int, offset: int, length: int) -> memoryview | None:
        try:
            raw = self.packs.read(pack, offset - packs.RECORD.size, packs.RECORD.size + length)
        except (OSError, RepositoryError):
            return None
        return packs.check_record(raw, length, oid)


def _runs(order: list[tuple[bytes, tuple[int, int, int]]]):
    """Groups (id, (pack, offset, length)) sorted by place into runs read at once."""
    head = packs.RECORD.size
    run: list = []
    first_pack = first_start = last_end = 0
    for item in order:
        pack, offset, length = item[1]
        if run:
            gap = offset - head - last_end
            span = offset + length - first_start
            if pack != first_pack or gap < 0 or gap > READ_GAP or span > READ_SPAN:
                yield run
                run = []
        if not run:
            first_pack, first_start = pack, offset - head
        run.append(item)
        last_end = offset + length
    if run:
        yield run
