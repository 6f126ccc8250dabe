"""Writing sessions and the uploads they make into staged packs.

A session is a write-key holder's backup: it owns at most one open pack at a
time (in staging, see packstore.py), appended to by one upload stream,
synced (fsync: the acknowledgement), and sealed when full or when the
session commits or ends.

What a sync made durable reaches the index in batches (``INDEX_BATCH``
objects, the end of an upload stream, a seal), not at every sync: each
index commit rewrites every index page it touches, and object ids are
random, so commits of a thousand objects cost twice as much per object as
commits of ten thousand. Until then the session's own appends know them
(``writer_ids``); after a crash ``PackStore.recover`` indexes staged packs
from their records, so an acknowledged object is never lost.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pysrbup.errors import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    StorageFullError,
    UsageError,
)
from pysrbup.repo import auth
from pysrbup.server import packs
from pysrbup.server.index import Index
from pysrbup.server.packstore import PackStore

#: A session not used for this long is ended (a dead client must not hold sweeps back).
SESSION_IDLE_SECONDS = 3600
#: Open sessions at once (each is a key holder's backup; more is a runaway client).
MAX_SESSIONS = 256
#: Durable objects a session gathers before they are committed to the index.
INDEX_BATCH = 16384


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
    #: Durable (fsynced) records of the open pack not yet in the index.
    unindexed: list[packs.Entry] = field(default_factory=list)
    stored_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class UploadCounts:
    stored: int = 0
    dropped: int = 0
    bytes_stored: int = 0


class Sessions:
    """The open sessions, and appending, syncing and sealing their packs."""

    def __init__(self, index: Index, pack_store: PackStore, counters):
        self.index = index
        self.pack_store = pack_store
        self.counters = counters
        self.by_id: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.counter = 0

    # ---- the table -------------------------------------------------------------------

    def begin(self, public_key: bytes) -> Session:
        self.reap_idle()
        with self.lock:
            if len(self.by_id) >= MAX_SESSIONS:
                raise StorageFullError(
                    f"too many open sessions ({MAX_SESSIONS}); try again when backups finish"
                )
            self.counter += 1
            session = Session(os.urandom(16).hex(), self.counter, public_key)
            self.by_id[session.session_id] = session
        self.counters.add(sessions_started=1)
        return session

    def verified(
        self, repo_id: bytes, session_id: str, seq: int, signature: bytes, op: str, body: bytes
    ) -> Session:
        """The session a request names, once its session proof verifies (each seq once)."""
        with self.lock:
            session = self.by_id.get(session_id)
        if session is None:
            raise NotFoundError("unknown or expired upload session")
        auth.verify(
            session.public_key,
            signature,
            auth.session_message(repo_id, session_id, seq, op, body),
            "session",
        )
        with session.lock:
            if seq in session.used_seqs:
                raise PermissionDeniedError("a session proof was replayed")
            session.used_seqs.add(seq)
        session.last_used = time.monotonic()
        return session

    def live(self, session: Session) -> Session:
        """``session`` if it is still open (a reaped or ended one is gone)."""
        with self.lock:
            if self.by_id.get(session.session_id) is not session:
                raise NotFoundError("unknown or expired upload session")
        session.last_used = time.monotonic()
        return session

    def reap_idle(self) -> None:
        now = time.monotonic()
        with self.lock:
            idle = [s for s in self.by_id.values() if now - s.last_used > SESSION_IDLE_SECONDS]
            for session in idle:
                del self.by_id[session.session_id]
        for session in idle:
            with session.lock, contextlib.suppress(Exception):
                self.seal(session)

    def forget(self, session: Session) -> None:
        with self.lock:
            if self.by_id.get(session.session_id) is not session:
                return
            del self.by_id[session.session_id]
        with session.lock:
            self.seal(session)

    def oldest_active(self) -> int | None:
        with self.lock:
            numbers = [s.number for s in self.by_id.values()]
        return min(numbers) if numbers else None

    def open_packs(self) -> set[int]:
        with self.lock:
            return {s.pack for s in self.by_id.values() if s.writer is not None}

    def all(self) -> list[Session]:
        with self.lock:
            return list(self.by_id.values())

    def close_all(self) -> None:
        with self.lock:
            every = list(self.by_id.values())
            self.by_id.clear()
        for session in every:
            with session.lock, contextlib.suppress(Exception):
                self.seal(session)

    # ---- writing ---------------------------------------------------------------------

    def commit(self, session: Session, index: bool = True) -> None:
        """fsyncs the session's staged pack; its durable records go to the index now if
        ``index``, else once ``INDEX_BATCH`` of them are waiting (see the module doc)."""
        if session.writer is None:
            return
        session.unindexed += session.writer.sync()
        if index or len(session.unindexed) >= INDEX_BATCH:
            self._index_durable(session)

    def _index_durable(self, session: Session) -> None:
        """Commits the session's durable, not yet indexed records to the index."""
        if not session.unindexed:
            return
        fresh, session.unindexed = session.unindexed, []
        self.index.add_objects(session.pack, fresh)
        added = sum(e.length for e in fresh)
        session.stored_bytes += added
        self.counters.add(objects_added=len(fresh), object_bytes_added=added)

    def seal(self, session: Session, wait: bool = False) -> None:
        """Seals the session's pack (the caller holds its lock) and has it uploaded."""
        if session.writer is None:
            return
        self.commit(session)
        writer, pack = session.writer, session.pack
        session.writer = None
        session.writer_ids = set()
        self.pack_store.seal(pack, writer, wait=wait)

    def open_stream(self, session: Session) -> int:
        """Makes a new upload stream the session's only writer; returns its number."""
        with session.lock:
            self.live(session)
            session.stream += 1
            self.drop_unsynced(session)
            return session.stream

    def _writer_of(self, session: Session, stream: int) -> None:
        if session.stream != stream:
            raise ConflictError("a newer upload stream took over this session")
        self.live(session)

    def append(
        self, session: Session, stream: int, records: Iterable[tuple[bytes, int, memoryview]]
    ) -> UploadCounts:
        """Appends records (id, flags, envelope) to the session's pack; durable after ``sync``.

        Per frame, not per record: one index query tells which ids are already
        stored, and the new records go to the pack with a few ``writev`` calls.
        """
        counts = UploadCounts()
        with session.lock:
            self._writer_of(session, stream)
            batch = [(bytes(oid), payload) for oid, _flags, payload in records]
            if any(len(payload) > packs.MAX_OBJECT_SIZE for _, payload in batch):
                raise UsageError("object too large")
            fresh = [oid for oid, _ in batch if oid not in session.writer_ids]
            stored = self.index.present_reviving_many(fresh) if fresh else set()
            taken: set[bytes] = set()  # this frame's, as writer_ids forgets them at a seal
            pending: list[tuple[bytes, memoryview]] = []
            size = session.writer.size if session.writer is not None else packs.HEADER.size
            for oid, payload in batch:
                if oid in session.writer_ids or oid in stored or oid in taken:
                    counts.dropped += 1
                    continue
                session.writer_ids.add(oid)
                taken.add(oid)
                pending.append((oid, payload))
                counts.stored += 1
                counts.bytes_stored += len(payload)
                size += packs.RECORD.size + len(payload)
                if size >= packs.TARGET_PACK_SIZE:  # this record fills the pack: seal it
                    self._write(session, pending)
                    self.seal(session)
                    pending = []
                    size = packs.HEADER.size
            if pending:
                self._write(session, pending)
        return counts

    def _write(self, session: Session, pending: list[tuple[bytes, memoryview]]) -> None:
        if session.writer is None:
            session.pack, session.writer = self.pack_store.create()
        session.writer.append_many(pending)

    def sync(self, session: Session, stream: int, index: bool = True) -> None:
        """Makes everything the stream appended durable, and visible in the index if
        ``index`` (else in a later batch)."""
        with session.lock:
            self._writer_of(session, stream)
            self.commit(session, index)

    def rollback(self, session: Session, stream: int) -> None:
        """Drops what ``stream`` appended since its last sync (its upload failed); what it
        made durable goes to the index now, so a client that comes back finds it."""
        with session.lock:
            if session.stream == stream:
                self.drop_unsynced(session)
                self._index_durable(session)

    @staticmethod
    def drop_unsynced(session: Session) -> None:
        if session.writer is not None:
            session.writer.rollback()
            session.writer_ids = {e.oid for e in session.writer.entries}
