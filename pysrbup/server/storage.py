"""The server's repository: packs, index, snapshot records and session keys.

Everything here works on ciphertext only; the server holds no key. Layout of
``<backups_dir>``::

    config              JSON: format, version, repo id, registered auth key
    lock                flock'ed by the one server using the directory
    index.sqlite        object id -> (pack, offset, length); the id log
    packs/ab/<id>.pack  append-only pack files (see packs.py)
    snapshots/<id>      encrypted snapshot records (SnapshotInfo protobuf)
    keys/<key id>       wrapped session keys

Writes are acknowledged only once durable: pack data is fsynced before its
index rows commit, and small files are written to a temporary name, fsynced
and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pysrbup.errors import (
    NotFoundError,
    PermissionDeniedError,
    RepositoryError,
    StorageFullError,
    UsageError,
)
from pysrbup.proto import service_pb2
from pysrbup.repo.auth import delete_message
from pysrbup.server import packs
from pysrbup.server.index import Index

FORMAT = "pysrbup-repo"
FORMAT_VERSION = 1
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{16}$")
KEY_ID_SIZE = 16
MAX_WRAPPED_KEY = 256
MAX_SNAPSHOT_RECORD = 1024 * 1024
SESSION_IDLE_SECONDS = 3600
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
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: packs.PackWriter | None = None
    pack: int = 0
    writer_ids: set[bytes] = field(default_factory=set)
    stored_bytes: int = 0
    stored_objects: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class UploadCounts:
    stored: int = 0
    dropped: int = 0
    bytes_stored: int = 0


class Repository:
    """A pysrbup repository directory, opened by one server process."""

    def __init__(self, root: str, append_only: bool = False, create: bool = True):
        self.root = os.path.abspath(root)
        self.append_only = append_only
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
        self.config = self._load_config()
        self.index = Index(os.path.join(self.root, "index.sqlite"))
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._challenges: dict[bytes, float] = {}
        self._read_fds: dict[int, int] = {}
        self._read_lock = threading.Lock()
        self._pack_names = {p: name for p, name, _ in self.index.packs()}
        self._cleanup_temp_files()
        self.recover()

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
                "auth_public_key": None,
            }
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

    @property
    def auth_public_key(self) -> bytes:
        value = self.config.get("auth_public_key")
        return bytes.fromhex(value) if value else b""

    def register_key(self, public_key: bytes) -> bytes:
        """Registers the key-derived Ed25519 public key once; returns the registered one."""
        if len(public_key) != 32:
            raise UsageError("an auth public key is 32 bytes")
        with self._config_lock:
            if not self.config.get("auth_public_key"):
                config = dict(self.config, auth_public_key=public_key.hex())
                write_atomic(
                    os.path.join(self.root, "config"), json.dumps(config, indent=2).encode()
                )
                self.config = config
        return self.auth_public_key

    # ---- start-up and shutdown ----------------------------------------

    def _cleanup_temp_files(self) -> None:
        for sub in ("snapshots", "keys"):
            folder = os.path.join(self.root, sub)
            for name in os.listdir(folder):
                if ".tmp." in name:
                    os.unlink(os.path.join(folder, name))
        if os.path.exists(os.path.join(self.root, "config.tmp")):
            os.unlink(os.path.join(self.root, "config.tmp"))

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
        """Seals open packs, closes files and releases the directory."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            with session.lock, contextlib.suppress(Exception):
                self._seal_session_pack(session)
        with self._read_lock:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
        self.index.close()
        os.close(self._lock_fd)

    # ---- sessions and uploads ------------------------------------------

    def begin_session(self) -> str:
        """Opens a writing session; its pack is created on the first upload."""
        self._reap_idle_sessions()
        session = Session(os.urandom(16).hex())
        with self._sessions_lock:
            self._sessions[session.session_id] = session
        return session.session_id

    def _session(self, session_id: str) -> Session:
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
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

    def _new_pack(self, session: Session) -> None:
        pack_id = os.urandom(packs.PACK_ID_SIZE)
        name = os.path.join("packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
        os.makedirs(os.path.join(self.root, os.path.dirname(name)), exist_ok=True)
        session.pack = self.index.add_pack(name)
        self._pack_names[session.pack] = name
        session.writer = packs.PackWriter(os.path.join(self.root, name), pack_id)

    def _commit(self, session: Session) -> None:
        """fsyncs the session's pack and commits its new records to the index."""
        if session.writer is None:
            return
        fresh = session.writer.sync()
        if fresh:
            self.index.add_objects(session.pack, fresh)
            session.stored_bytes += sum(e.length for e in fresh)
            session.stored_objects += len(fresh)

    def _seal_session_pack(self, session: Session) -> None:
        if session.writer is None:
            return
        self._commit(session)
        session.writer.seal()
        self.index.mark_sealed(session.pack)
        session.writer = None
        session.writer_ids = set()

    def append(
        self, session_id: str, records: Iterable[tuple[bytes, int, memoryview]]
    ) -> UploadCounts:
        """Appends records (id, flags, envelope) to the session's pack; durable after ``sync``."""
        session = self._session(session_id)
        counts = UploadCounts()
        with session.lock:
            for oid, _flags, payload in records:
                oid = bytes(oid)
                if len(payload) > packs.MAX_OBJECT_SIZE:
                    raise UsageError("object too large")
                if oid in session.writer_ids or self.index.contains(oid):
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

    def sync(self, session_id: str) -> None:
        """Makes everything the session appended durable and visible."""
        session = self._session(session_id)
        with session.lock:
            self._commit(session)

    def rollback(self, session_id: str) -> None:
        """Drops what the session appended since its last sync (a failed upload)."""
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            return
        with session.lock:
            if session.writer is not None:
                session.writer.rollback()
                session.writer_ids = {e.oid for e in session.writer.entries}

    def put_session_key(self, key_id: bytes, wrapped: bytes) -> None:
        """Stores a wrapped session key (write once)."""
        if len(key_id) != KEY_ID_SIZE or not 0 < len(wrapped) <= MAX_WRAPPED_KEY:
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
                yield bytes.fromhex(name), handle.read(MAX_WRAPPED_KEY)

    def end_session(self, session_id: str) -> Session:
        """Seals the session's pack and forgets the session."""
        session = self._session(session_id)
        with session.lock:
            self._seal_session_pack(session)
        with self._sessions_lock:
            self._sessions.pop(session_id, None)
        return session

    def commit_snapshot(self, session_id: str, snapshot_id: str, record: bytes) -> str:
        """Ends the session and stores its snapshot record durably."""
        if not SNAPSHOT_ID.match(snapshot_id):
            raise UsageError("malformed snapshot id")
        if not 0 < len(record) <= MAX_SNAPSHOT_RECORD:
            raise UsageError("malformed snapshot record")
        path = self._snapshot_path(snapshot_id)
        if os.path.exists(path):
            raise UsageError(f"snapshot {snapshot_id} already exists")
        session = self._session(session_id)
        with session.lock:
            self._seal_session_pack(session)
        info = service_pb2.SnapshotInfo(
            snapshot_id=snapshot_id,
            created_ns=time.time_ns(),
            stored_bytes=session.stored_bytes,
            record=record,
        )
        write_atomic(path, info.SerializeToString())
        with self._sessions_lock:
            self._sessions.pop(session_id, None)
        return snapshot_id

    # ---- snapshots -------------------------------------------------------

    def _snapshot_path(self, snapshot_id: str) -> str:
        return os.path.join(self.root, "snapshots", snapshot_id)

    def snapshots(self) -> list[service_pb2.SnapshotInfo]:
        """Every snapshot record, oldest first."""
        infos = []
        folder = os.path.join(self.root, "snapshots")
        for name in os.listdir(folder):
            if not SNAPSHOT_ID.match(name):
                continue
            info = service_pb2.SnapshotInfo()
            with open(os.path.join(folder, name), "rb") as handle:
                info.ParseFromString(handle.read())
            infos.append(info)
        infos.sort(key=lambda i: (i.created_ns, i.snapshot_id))
        return infos

    def new_challenge(self) -> bytes:
        """A single-use challenge for a destructive request."""
        challenge = os.urandom(32)
        now = time.monotonic()
        with self._config_lock:
            self._challenges = {c: t for c, t in self._challenges.items() if t > now}
            self._challenges[challenge] = now + CHALLENGE_SECONDS
        return challenge

    def _check_proof(self, challenge: bytes, signature: bytes, message: bytes) -> None:
        if self.append_only:
            raise PermissionDeniedError("the server is append-only: deleting is refused")
        with self._config_lock:
            expiry = self._challenges.pop(challenge, None)
        if expiry is None or expiry < time.monotonic():
            raise PermissionDeniedError("unknown, used or expired challenge")
        public = self.auth_public_key
        if not public:
            raise PermissionDeniedError("no key is registered for this repository")
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            raise PermissionDeniedError("the proof of key does not verify") from None

    def delete_snapshot(self, snapshot_id: str, challenge: bytes, signature: bytes) -> None:
        """Removes a snapshot record after checking the key holder's proof."""
        if not SNAPSHOT_ID.match(snapshot_id):
            raise NotFoundError(f"no backup {snapshot_id!r}")
        self._check_proof(
            challenge, signature, delete_message(self.repo_id, challenge, snapshot_id)
        )
        path = self._snapshot_path(snapshot_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NotFoundError(f"no backup {snapshot_id}") from None
        packs.fsync_dir(os.path.dirname(path))

    # ---- reads -------------------------------------------------------------

    def _read_fd(self, pack: int) -> int:
        with self._read_lock:
            fd = self._read_fds.get(pack)
            if fd is None:
                if len(self._read_fds) >= 64:
                    _, old = self._read_fds.popitem()
                    os.close(old)
                fd = os.open(os.path.join(self.root, self._pack_names[pack]), os.O_RDONLY)
                self._read_fds[pack] = fd
            return fd

    def fetch(self, oids: list[bytes]) -> Iterator[tuple[bytes, int, memoryview | bytes]]:
        """Yields (id, status, envelope) in pack order; status 0 found, 1 missing, 2 damaged."""
        found = self.index.lookup_many(oids)
        for oid in oids:
            if oid not in found:
                yield oid, 1, b""
        order = sorted(found.items(), key=lambda item: item[1])
        for oid, (pack, offset, length) in order:
            try:
                payload = packs.read_record(self._read_fd(pack), offset, length, oid)
            except OSError:
                payload = None
            if payload is None:
                yield oid, 2, b""
            else:
                yield oid, 0, payload
