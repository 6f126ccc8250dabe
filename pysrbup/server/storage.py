"""The server's repository: packs, index, snapshot records and session keys.

Everything here works on ciphertext only; the server holds no key. Layout of
``<backups_dir>``::

    config              JSON: format, version, repo id, write and destroy public keys
    init-token          the one-time secret that lets the owner initialise (mode 0600;
                        removed by ``pysrbup-client init``)
    lock                flock'ed by the one server using the directory
    index.sqlite        object id -> (pack, offset, length); the id log
    packs/ab/<id>.pack  append-only pack files (see packs.py)
    snapshots/<id>      encrypted snapshot records (see snapshot_store.py)
    keys/<key id>       wrapped session keys

Writes are acknowledged only once durable: pack data is fsynced before its
index rows commit, and small files are written to a temporary name, fsynced
and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

from pysrbup.errors import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RepositoryError,
    StorageFullError,
    UsageError,
)
from pysrbup.repo import auth, wire
from pysrbup.server import ecc, packs, snapshot_store
from pysrbup.server.index import Index

FORMAT = "pysrbup-repo"
FORMAT_VERSION = 1
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{16}$")
INIT_TOKEN = "init-token"
#: A session not used for this long is ended (a dead client must not hold sweeps back).
SESSION_IDLE_SECONDS = 3600
#: Open sessions at once (each is a key holder's backup; more is a runaway client).
MAX_SESSIONS = 256
#: Outstanding challenges; the oldest is forgotten beyond this (anyone may ask for one).
MAX_CHALLENGES = 4096
#: A sealed pack is rewritten once this fraction of it is garbage.
COMPACT_DEAD_FRACTION = 0.05
log = logging.getLogger("pysrbup.server")
CHALLENGE_SECONDS = 300


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` durably: temp file, fsync, rename, fsync dir."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        packs.fsync_dir(os.path.dirname(path))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError("server disk is full") from None
        raise RepositoryError(f"cannot write {path}: {exc.strerror}") from None


@dataclass
class Session:
    """One writing session: its open pack and what it added."""

    session_id: str
    number: int = 0
    public_key: bytes = b""
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Sequence numbers of the session proofs already used (each is accepted once).
    used_seqs: set[int] = field(default_factory=set)
    #: The one upload stream allowed to write; a newer stream supersedes it.
    stream: int = 0
    writer: packs.PackWriter | None = None
    pack: int = 0
    writer_ids: set[bytes] = field(default_factory=set)
    stored_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Marker:
    done: threading.Event


@dataclass
class ScrubReport:
    """What a scrub found: counts, and the chunk ids in damaged, unrepairable places."""

    packs: int = 0
    packs_unprotected: int = 0
    blocks_checked: int = 0
    blocks_repaired: int = 0
    blocks_unrepairable: int = 0
    records_checked: int = 0
    sidecars_written: int = 0
    damaged: dict[str, list[bytes]] = field(default_factory=dict)


def _has_packs(root: str) -> bool:
    for _, _, files in os.walk(os.path.join(root, "packs")):
        if any(name.endswith(".pack") for name in files):
            return True
    return False


@dataclass
class UploadCounts:
    stored: int = 0
    dropped: int = 0
    bytes_stored: int = 0


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
    """A pysrbup repository directory, opened by one server process."""

    def __init__(
        self,
        root: str,
        append_only: bool = False,
        create: bool = True,
        ecc_level: ecc.EccLevel | None = ecc.DEFAULT_LEVEL,
    ):
        self.root = os.path.abspath(root)
        self.append_only = append_only
        self.ecc_level = ecc_level
        if not os.path.isdir(self.root):
            if not create:
                raise RepositoryError(f"{self.root} is not a pysrbup repository")
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise RepositoryError(f"cannot create {self.root}: {exc.strerror}") from None
        for sub in ("packs", "snapshots", "keys"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RepositoryError(f"{self.root} is in use by another pysrbup-server") from None
        self._config_lock = threading.Lock()
        try:
            self.config = self._load_config()
            if not self.initialised and not os.path.exists(self.init_token_path):
                self._write_init_token()  # e.g. removed by hand before anyone initialised
            index_path = os.path.join(self.root, "index.sqlite")
            if not os.path.exists(index_path) and _has_packs(self.root):
                raise RepositoryError(
                    f"the index {index_path} is missing; run pysrbup-server --rebuild-index"
                )
            self.index = Index(index_path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._session_counter = 0
        self.counters = Counters()
        self._gc_lock = threading.Lock()
        # Guards a pack file's life (parity, repair, scrub, compaction) apart from
        # _gc_lock, so a commit never waits for parity being computed.
        self._pack_lock = threading.RLock()
        self._challenges: dict[bytes, float] = {}
        self._read_fds: dict[int, int] = {}
        self._read_lock = threading.Lock()
        self._pack_names = {p: name for p, name, _ in self.index.packs()}
        self._ecc_queue: queue.Queue = queue.Queue()
        self._ecc_thread: threading.Thread | None = None
        self._cleanup_temp_files()
        self.recover()
        self.collect_garbage(force=True)  # no session survives a restart: sweep every condemnation
        if self.ecc_level is not None:
            for _, name, sealed in self.index.packs():
                path = os.path.join(self.root, name)
                if sealed and os.path.exists(path) and not os.path.exists(ecc.sidecar_path(path)):
                    self._protect(path)

    # ---- configuration -------------------------------------------------

    def _load_config(self) -> dict:
        path = os.path.join(self.root, "config")
        if not os.path.exists(path):
            if os.listdir(os.path.join(self.root, "packs")):
                raise RepositoryError(f"{path} is missing but packs exist; refusing to start")
            config = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "repo_id": os.urandom(16).hex(),
                "created": time.time(),
                "write_public_key": None,
                "destroy_public_key": None,
            }
            self._write_init_token()
            write_atomic(path, json.dumps(config, indent=2).encode())
            return config
        try:
            with open(path, "rb") as handle:
                config = json.loads(handle.read())
            if config.get("format") != FORMAT:
                raise ValueError("not a pysrbup repository")
            if config.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported repository version {config.get('version')}")
            bytes.fromhex(config["repo_id"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{path} is damaged or not a pysrbup config: {exc}") from None
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
            write_atomic(os.path.join(self.root, "config"), json.dumps(config, indent=2).encode())
            self.config = config
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.init_token_path)

    # ---- start-up and shutdown ----------------------------------------

    def _cleanup_temp_files(self) -> None:
        """Removes what a crash left of writes that never completed (temp files only)."""
        for sub in ("snapshots", "keys"):
            folder = os.path.join(self.root, sub)
            for name in os.listdir(folder):
                if ".tmp." in name:  # write_atomic's temp names
                    os.unlink(os.path.join(folder, name))
        for name in os.listdir(self.root):
            if name.startswith("config.tmp."):
                os.unlink(os.path.join(self.root, name))
        for folder, _, files in os.walk(os.path.join(self.root, "packs")):
            for name in files:
                if name.endswith(ecc.SIDECAR_SUFFIX + ".tmp"):  # a parity file being written
                    os.unlink(os.path.join(folder, name))

    def recover(self) -> None:
        """Seals packs left open by a crash and indexes their intact records."""
        for pack, name, sealed in self.index.packs():
            if sealed:
                continue
            path = os.path.join(self.root, name)
            if not os.path.exists(path):
                self.index.mark_sealed(pack)
                continue
            try:
                entries = packs.recover(path)
            except RepositoryError:
                os.unlink(path)
                self.index.mark_sealed(pack)
                continue
            self.index.add_objects(pack, entries)
            self.index.mark_sealed(pack)

    def close(self) -> None:
        """Seals open packs, finishes parity, closes files and releases the directory."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            with session.lock, contextlib.suppress(Exception):
                self._seal_session_pack(session)
        if self._ecc_thread is not None:
            self._ecc_queue.put(None)
            self._ecc_thread.join()
        with self._read_lock:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
        self.index.close()
        os.close(self._lock_fd)

    # ---- sessions and uploads ------------------------------------------

    def begin_session(self, challenge: bytes, session_public: bytes, signature: bytes) -> str:
        """Opens a writing session for a write-key holder, bound to ``session_public``.

        Its pack is created on the first upload.
        """
        if len(session_public) != 32:
            raise UsageError("a session public key is 32 bytes")
        self._take_challenge(challenge)
        auth.verify(
            self.write_public_key,
            signature,
            auth.begin_message(self.repo_id, challenge, session_public),
            "write",
        )
        self._reap_idle_sessions()
        with self._sessions_lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise StorageFullError(
                    f"too many open sessions ({MAX_SESSIONS}); try again when backups finish"
                )
            self._session_counter += 1
            session = Session(os.urandom(16).hex(), self._session_counter, session_public)
            self._sessions[session.session_id] = session
        self.counters.add(sessions_started=1)
        return session.session_id

    @property
    def open_sessions(self) -> int:
        """Writing sessions open now (for the metrics)."""
        return len(self._sessions)

    def session(self, session_id: str, seq: int, signature: bytes, op: str, body: bytes) -> Session:
        """The session a request names, once its session proof verifies (each seq once)."""
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError("unknown or expired upload session")
        auth.verify(
            session.public_key,
            signature,
            auth.session_message(self.repo_id, session_id, seq, op, body),
            "session",
        )
        with session.lock:
            if seq in session.used_seqs:
                raise PermissionDeniedError("a session proof was replayed")
            session.used_seqs.add(seq)
        session.last_used = time.monotonic()
        return session

    def _live(self, session: Session) -> Session:
        """``session`` if it is still open (a reaped or ended one is gone)."""
        with self._sessions_lock:
            if self._sessions.get(session.session_id) is not session:
                raise NotFoundError("unknown or expired upload session")
        session.last_used = time.monotonic()
        return session

    def _reap_idle_sessions(self) -> None:
        now = time.monotonic()
        with self._sessions_lock:
            idle = [s for s in self._sessions.values() if now - s.last_used > SESSION_IDLE_SECONDS]
            for session in idle:
                del self._sessions[session.session_id]
        for session in idle:
            with session.lock, contextlib.suppress(Exception):
                self._seal_session_pack(session)

    def _create_pack(self) -> tuple[int, packs.PackWriter]:
        pack_id = os.urandom(packs.PACK_ID_SIZE)
        name = os.path.join("packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
        os.makedirs(os.path.join(self.root, os.path.dirname(name)), exist_ok=True)
        pack = self.index.add_pack(name)
        self._pack_names[pack] = name
        return pack, packs.PackWriter(os.path.join(self.root, name), pack_id)

    def _new_pack(self, session: Session) -> None:
        session.pack, session.writer = self._create_pack()

    def _commit(self, session: Session) -> None:
        """fsyncs the session's pack and commits its new records to the index."""
        if session.writer is None:
            return
        fresh = session.writer.sync()
        if fresh:
            self.index.add_objects(session.pack, fresh)
            added = sum(e.length for e in fresh)
            session.stored_bytes += added
            self.counters.add(objects_added=len(fresh), object_bytes_added=added)

    def _seal_session_pack(self, session: Session) -> None:
        if session.writer is None:
            return
        self._commit(session)
        session.writer.seal()
        self.index.mark_sealed(session.pack)
        self._protect(session.writer.path)
        session.writer = None
        session.writer_ids = set()

    def open_stream(self, session: Session) -> int:
        """Makes a new upload stream the session's only writer; returns its number.

        What an earlier stream appended and did not sync is dropped first: it
        was never acknowledged, so its client sends it again.
        """
        with session.lock:
            self._live(session)
            session.stream += 1
            self._drop_unsynced(session)
            return session.stream

    def _writer_of(self, session: Session, stream: int) -> None:
        if session.stream != stream:
            raise ConflictError("a newer upload stream took over this session")
        self._live(session)

    def append(
        self, session: Session, stream: int, records: Iterable[tuple[bytes, int, memoryview]]
    ) -> UploadCounts:
        """Appends records (id, flags, envelope) to the session's pack; durable after ``sync``."""
        counts = UploadCounts()
        with session.lock:
            self._writer_of(session, stream)
            for oid, _flags, payload in records:
                oid = bytes(oid)
                if len(payload) > packs.MAX_OBJECT_SIZE:
                    raise UsageError("object too large")
                if oid in session.writer_ids or self.index.present_reviving(oid):
                    counts.dropped += 1
                    continue
                if session.writer is None:
                    self._new_pack(session)
                session.writer.append(oid, payload)
                session.writer_ids.add(oid)
                counts.stored += 1
                counts.bytes_stored += len(payload)
                if session.writer.size >= packs.TARGET_PACK_SIZE:
                    self._seal_session_pack(session)
        return counts

    def sync(self, session: Session, stream: int) -> None:
        """Makes everything the stream appended durable and visible in the index."""
        with session.lock:
            self._writer_of(session, stream)
            self._commit(session)

    def rollback(self, session: Session, stream: int) -> None:
        """Drops what ``stream`` appended since its last sync (its upload failed).

        Only the session's current writer can roll back, and only its own
        unsynced records: a superseded stream's records were dropped when the
        new one took over, and synced records are never taken back.
        """
        with session.lock:
            if session.stream == stream:
                self._drop_unsynced(session)

    @staticmethod
    def _drop_unsynced(session: Session) -> None:
        if session.writer is not None:
            session.writer.rollback()
            session.writer_ids = {e.oid for e in session.writer.entries}

    def put_session_key(self, session: Session, key_id: bytes, wrapped: bytes) -> None:
        """Stores a wrapped session key (write once) for a live session."""
        self._live(session)
        if len(key_id) != wire.KEY_ID_SIZE or not 0 < len(wrapped) <= wire.MAX_WRAPPED_KEY:
            raise UsageError("malformed session key")
        path = os.path.join(self.root, "keys", key_id.hex())
        if os.path.exists(path):
            return
        write_atomic(path, wrapped)

    def session_keys(self) -> Iterator[tuple[bytes, bytes]]:
        folder = os.path.join(self.root, "keys")
        for name in sorted(os.listdir(folder)):
            if ".tmp." in name:
                continue
            with open(os.path.join(folder, name), "rb") as handle:
                yield bytes.fromhex(name), handle.read(wire.MAX_WRAPPED_KEY)

    def _forget_session(self, session: Session) -> None:
        with self._sessions_lock:
            if self._sessions.get(session.session_id) is not session:
                return
            del self._sessions[session.session_id]
        with session.lock:
            self._seal_session_pack(session)

    def end_session(self, session: Session) -> Session:
        """Seals the session's pack and forgets the session."""
        self._live(session)
        self._forget_session(session)
        self.collect_garbage()
        return session

    def committed_record(self, snapshot_id: str) -> bytes | None:
        """The stored record of ``snapshot_id``, if there is one (a retried commit)."""
        if not SNAPSHOT_ID.match(snapshot_id):
            return None
        try:
            return self._read_snapshot(snapshot_id).record
        except FileNotFoundError:
            return None

    def _read_snapshot(self, snapshot_id: str) -> snapshot_store.StoredSnapshot:
        with open(self._snapshot_path(snapshot_id), "rb") as handle:
            data = handle.read(wire.MAX_SNAPSHOT_RECORD + snapshot_store.HEADER.size + 1)
        return snapshot_store.decode(snapshot_id, data)

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
                self._forget_session(session)
                return snapshot_id
            raise UsageError(f"snapshot {snapshot_id} already exists")
        self._live(session)
        with session.lock:
            self._seal_session_pack(session)
        with self._gc_lock:
            if self.index.condemned_after(checked_seq):
                raise ConflictError("objects were condemned during the backup; sync and retry")
            self._write_snapshot(session, snapshot_id, record, self._snapshot_path(snapshot_id))
        self._forget_session(session)
        self.collect_garbage()
        return snapshot_id

    def _write_snapshot(self, session: Session, snapshot_id: str, record: bytes, path: str):
        stored = snapshot_store.StoredSnapshot(
            snapshot_id, time.time_ns(), session.stored_bytes, record
        )
        write_atomic(path, snapshot_store.encode(stored))

    # ---- snapshots -------------------------------------------------------

    def _snapshot_path(self, snapshot_id: str) -> str:
        return os.path.join(self.root, "snapshots", snapshot_id)

    def snapshot_ids(self) -> list[str]:
        """The ids of every stored snapshot record."""
        folder = os.path.join(self.root, "snapshots")
        return sorted(name for name in os.listdir(folder) if SNAPSHOT_ID.match(name))

    def snapshots(self) -> list[snapshot_store.StoredSnapshot]:
        """Every snapshot record, oldest first (a damaged file is logged and skipped)."""
        stored = []
        for snapshot_id in self.snapshot_ids():
            try:
                stored.append(self._read_snapshot(snapshot_id))
            except FileNotFoundError:
                continue  # deleted meanwhile
            except RepositoryError as exc:
                log.error("%s", exc)
        stored.sort(key=lambda s: (s.created_ns, s.snapshot_id))
        return stored

    def new_challenge(self) -> bytes:
        """A single-use challenge for BeginSession or a destructive request."""
        challenge = os.urandom(32)
        now = time.monotonic()
        with self._config_lock:
            if len(self._challenges) >= MAX_CHALLENGES:
                self._challenges = {c: t for c, t in self._challenges.items() if t > now}
            while len(self._challenges) >= MAX_CHALLENGES:  # insertion order: oldest first
                del self._challenges[next(iter(self._challenges))]
            self._challenges[challenge] = now + CHALLENGE_SECONDS
        return challenge

    def _take_challenge(self, challenge: bytes) -> None:
        with self._config_lock:
            expiry = self._challenges.pop(challenge, None)
        if expiry is None or expiry < time.monotonic():
            raise PermissionDeniedError("unknown, used or expired challenge")

    def _check_destroy(self, challenge: bytes, signature: bytes, message: bytes) -> None:
        if self.append_only:
            raise PermissionDeniedError("the server is append-only: deleting is refused")
        self._take_challenge(challenge)
        auth.verify(self.destroy_public_key, signature, message, "destroy")

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
        path = self._snapshot_path(snapshot_id)
        with self._gc_lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                if self.index.get_meta("deleted:" + snapshot_id) is not None:
                    return True
                raise NotFoundError(f"no backup {snapshot_id}") from None
            self.index.set_meta("deleted:" + snapshot_id, b"1")
            packs.fsync_dir(os.path.dirname(path))
        return False

    # ---- garbage collection --------------------------------------------------

    def condemn(
        self, oids: list[bytes], snapshot_set: bytes, challenge: bytes, signature: bytes
    ) -> tuple[int, int, int]:
        """Condemns unreferenced objects; returns (count, bytes freed now, bytes pending).

        Refused with ConflictError when the snapshots the client computed the
        live set from (``snapshot_set``, signed) are not the ones stored now:
        one was committed or deleted since, or the listing it saw was not the
        real one.
        """
        blob = b"".join(oids)
        message = auth.condemn_message(self.repo_id, challenge, snapshot_set, blob)
        self._check_destroy(challenge, signature, message)
        with self._gc_lock:
            if snapshot_set != auth.snapshot_set_digest(self.snapshot_ids()):
                raise ConflictError(
                    "the backups stored differ from the ones the client saw; list them again"
                )
            with self._sessions_lock:
                watermark = self._session_counter
            count, _ = self.index.condemn(oids, watermark)
        freed = self.collect_garbage(force=True)
        return count, freed, self.index.pending_condemned_bytes()

    def revive(self, session: Session, oids: list[bytes]) -> list[bytes]:
        """Takes condemned objects a session relies on back; returns those already gone."""
        self._live(session)
        with self._gc_lock:
            return self.index.revive(oids)

    def _oldest_active_session(self) -> int | None:
        with self._sessions_lock:
            numbers = [s.number for s in self._sessions.values()]
        return min(numbers) if numbers else None

    def collect_garbage(self, force: bool = False) -> int:
        """Sweeps condemned objects no session relies on and compacts packs; bytes freed.

        Packs are only examined when the sweep removed something (or ``force``),
        so the commits and session ends that call this stay cheap.
        """
        self._reap_idle_sessions()  # a client that died must not hold sweeps back forever
        with self._gc_lock:
            swept = self.index.sweep(self._oldest_active_session())
            if not swept and not force:
                return 0
            return self._compact()

    def _compact(self) -> int:
        usage = self.index.pack_usage()
        with self._sessions_lock:
            open_packs = {s.pack for s in self._sessions.values() if s.writer is not None}
        freed = 0
        for pack, name, sealed in self.index.packs():
            if not sealed or pack in open_packs:
                continue
            path = os.path.join(self.root, name)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                size = 0
            count, used = usage.get(pack, (0, 0))
            live = packs.HEADER.size + used + count * packs.ENTRY.size + packs.TRAILER.size
            with self._pack_lock:
                if count == 0:
                    freed += self._drop_pack(pack, path, size)
                elif size - live > COMPACT_DEAD_FRACTION * size:
                    freed += self._rewrite_pack(pack, path, size)
        return freed

    def _drop_pack(self, pack: int, path: str, size: int) -> int:
        if not self.index.remove_pack(pack):
            return 0
        self._forget_fd(pack)
        sidecar = ecc.sidecar_path(path)
        with contextlib.suppress(FileNotFoundError):
            size += os.path.getsize(sidecar)
            os.unlink(sidecar)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        packs.fsync_dir(os.path.dirname(path))
        return size

    # ---- error correction ------------------------------------------------------

    def _protect(self, path: str) -> None:
        """Queues parity for a sealed pack (computed off the upload's critical path)."""
        if self.ecc_level is None:
            return
        if self._ecc_thread is None:
            self._ecc_thread = threading.Thread(
                target=self._ecc_worker, name="pysrbup-ecc", daemon=True
            )
            self._ecc_thread.start()
        self._ecc_queue.put(path)

    def _ecc_worker(self) -> None:
        while True:
            path = self._ecc_queue.get()
            if path is None:
                return
            if isinstance(path, _Marker):
                path.done.set()
                continue
            try:
                with self._pack_lock:  # compaction must not drop the pack meanwhile
                    if os.path.exists(path) and not os.path.exists(ecc.sidecar_path(path)):
                        self._write_verified_sidecar(path)
            except OSError as exc:
                log.error("cannot write parity for %s: %s", path, exc)

    def _write_verified_sidecar(self, path: str) -> bool:
        """Re-reads a sealed pack and writes its parity only if every record verifies.

        Parity over rotten data would make the rot permanent, so a pack that
        fails here is logged ("detected data corruption") and left unprotected.
        """
        problem = ecc.write_sidecar(path, self.ecc_level, verify=packs.damaged_in)
        if problem:
            log.error(
                "detected data corruption in %s (%s); not writing parity over it", path, problem
            )
            return False
        return True

    def wait_for_parity(self) -> None:
        """Blocks until every queued sidecar is written (tests, scrub)."""
        if self._ecc_thread is not None:
            done = threading.Event()
            self._ecc_queue.put(_Marker(done))
            done.wait()

    def _repair(self, pack: int) -> bool:
        """Verifies and repairs a pack after a failed read; True if it is now whole."""
        path = os.path.join(self.root, self._pack_names.get(pack, ""))
        with self._pack_lock:
            try:
                result = ecc.check_pack(path)
            except FileNotFoundError:
                log.error("pack %s is missing: its objects are lost", path)
                return False
        self.counters.add(read_repairs=1, read_repaired_blocks=result.blocks_repaired)
        if result.blocks_repaired:
            log.warning("repaired %d damaged block(s) of %s", result.blocks_repaired, path)
        return not result.unprotected and not result.blocks_unrepairable

    def scrub(self) -> ScrubReport:
        """Verifies every sealed pack (and its parity) and repairs what parity allows."""
        report = ScrubReport()
        for pack, name, sealed in self.index.packs():
            if not sealed:
                continue
            path = os.path.join(self.root, name)
            with self._pack_lock:
                if not os.path.exists(path):
                    lost = [e.oid for e in self.index.pack_objects(pack)]
                    if lost:  # deleted behind the server's back
                        log.error("pack %s is missing: its objects are lost", path)
                        report.packs += 1
                        report.damaged[name] = lost
                    continue
                result = ecc.check_pack(path)
                entries = self.index.pack_objects(pack)
                if result.unprotected:
                    report.packs_unprotected += 1
                    fd = self._read_fd(pack)
                    damaged = [
                        e
                        for e in entries
                        if packs.read_record(fd, e.offset, e.length, e.oid) is None
                    ]
                    report.records_checked += len(entries)
                    bad_ids = [e.oid for e in damaged]
                    if (  # e.g. a deleted sidecar
                        not bad_ids
                        and self.ecc_level is not None
                        and self._write_verified_sidecar(path)
                    ):
                        report.sidecars_written += 1
                else:
                    bad_ids = [
                        e.oid
                        for e in entries
                        if any(
                            e.offset - packs.RECORD.size < end and start < e.offset + e.length
                            for start, end in result.bad_ranges
                        )
                    ]
            report.packs += 1
            report.blocks_checked += result.blocks_checked
            report.blocks_repaired += result.blocks_repaired
            report.blocks_unrepairable += result.blocks_unrepairable
            if bad_ids or result.blocks_unrepairable:
                report.damaged[name] = bad_ids
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

    def _rewrite_pack(self, pack: int, path: str, size: int) -> int:
        """Copies a pack's live records into a new pack, then drops the old one."""
        entries = self.index.pack_objects(pack)
        new_pack, writer = self._create_pack()
        moved = []
        fd = self._read_fd(pack)
        for entry in entries:
            payload = packs.read_record(fd, entry.offset, entry.length, entry.oid)
            if payload is None:
                log.error("not compacting %s: record %s is damaged", path, entry.oid.hex())
                writer.abandon()
                os.unlink(writer.path)
                self.index.remove_pack(new_pack)
                return 0
            moved.append(writer.append(entry.oid, payload))
        writer.seal()
        self.index.mark_sealed(new_pack)
        if self.ecc_level is not None:  # protected before the old copy goes
            self._write_verified_sidecar(writer.path)
        self.index.move_objects(pack, new_pack, moved)
        return max(0, self._drop_pack(pack, path, size) - writer.size)

    def _forget_fd(self, pack: int) -> None:
        with self._read_lock:
            fd = self._read_fds.pop(pack, None)
        if fd is not None:
            os.close(fd)

    # ---- reads -------------------------------------------------------------

    def _read_fd(self, pack: int) -> int:
        with self._read_lock:
            fd = self._read_fds.get(pack)
            if fd is None:
                if len(self._read_fds) >= 64:  # forget the oldest (dicts keep insertion order)
                    os.close(self._read_fds.pop(next(iter(self._read_fds))))
                fd = os.open(os.path.join(self.root, self._pack_names[pack]), os.O_RDONLY)
                self._read_fds[pack] = fd
            return fd

    def stats(self) -> dict[str, int]:
        """Counts and bytes of what the repository holds on disk."""
        objects, object_bytes, condemned, condemned_bytes = self.index.totals()
        pack_bytes = parity_bytes = count = 0
        for _, name, _ in self.index.packs():
            path = os.path.join(self.root, name)
            with contextlib.suppress(FileNotFoundError):
                pack_bytes += os.path.getsize(path)
                count += 1
            with contextlib.suppress(FileNotFoundError):
                parity_bytes += os.path.getsize(ecc.sidecar_path(path))
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
        """One byte per id: 1 if the repository stores it (its pack file exists), else 0."""
        found = self.index.lookup_many(oids)
        exists = {}
        for pack, _, _ in found.values():
            if pack not in exists:
                name = self._pack_names.get(pack)
                exists[pack] = bool(name) and os.path.exists(os.path.join(self.root, name))
        return bytes(1 if oid in found and exists[found[oid][0]] else 0 for oid in oids)

    def fetch(self, oids: list[bytes]) -> Iterator[tuple[bytes, int, memoryview | bytes]]:
        """Yields (id, ``wire.FETCH_*`` status, envelope) in pack order."""
        found = self.index.lookup_many(oids)
        for oid in oids:
            if oid not in found:
                yield oid, wire.FETCH_MISSING, b""
        order = sorted(found.items(), key=lambda item: item[1])
        repaired: dict[int, bool] = {}
        for oid, where in order:
            payload = self._read(oid, *where)
            if payload is None:  # compaction may have just moved it: look again
                again = self.index.lookup_many([oid]).get(oid)
                payload = self._read(oid, *again) if again and again != where else None
            if payload is None:  # bit rot: rebuild the pack from parity, once per request
                if where[0] not in repaired:
                    repaired[where[0]] = self._repair(where[0])
                if repaired[where[0]]:
                    payload = self._read(oid, *where)
                if payload is not None:
                    self.counters.add(read_repaired_objects=1)
            if payload is None:
                self.counters.add(read_damaged_objects=1)
                yield oid, wire.FETCH_DAMAGED, b""
            else:
                yield oid, wire.FETCH_FOUND, payload

    def _read(self, oid: bytes, pack: int, offset: int, length: int) -> memoryview | None:
        try:
            return packs.read_record(self._read_fd(pack), offset, length, oid)
        except (OSError, KeyError):
            return None


def rebuild_index(root: str) -> tuple[int, int]:
    """Rebuilds the index from the packs' own footers; returns (packs, objects).

    The old index is kept beside as ``index.sqlite.broken-<time>``. Packs are
    verified (and repaired from parity) first; a pack left open by a crash is
    recovered up to its last intact record.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(os.path.join(root, "packs")):
        raise RepositoryError(f"{root} is not a pysrbup repository")
    lock_fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepositoryError(f"{root} is in use by a running pysrbup-server") from None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = os.path.join(root, "index.sqlite" + suffix)
            if os.path.exists(old):
                os.replace(old, os.path.join(root, f"index.sqlite.broken-{stamp}{suffix}"))
        index = Index(os.path.join(root, "index.sqlite"))
        count_packs = count_objects = 0
        try:
            for folder, _, files in sorted(os.walk(os.path.join(root, "packs"))):
                for name in sorted(files):
                    if not name.endswith(".pack"):
                        continue
                    path = os.path.join(folder, name)
                    ecc.check_pack(path)
                    try:
                        entries = packs.recover(path)
                    except (RepositoryError, OSError) as exc:
                        log.error("skipping %s: %s", path, exc)
                        continue
                    pack = index.add_pack(os.path.relpath(path, root))
                    count_objects += index.add_objects(pack, entries)
                    index.mark_sealed(pack)
                    count_packs += 1
        finally:
            index.close()
        return count_packs, count_objects
    finally:
        os.close(lock_fd)
