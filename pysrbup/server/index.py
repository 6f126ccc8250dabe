"""The SQLite index: object id -> (pack, offset, length), the id log, condemnations.

``idlog`` is the append-only log clients sync their id cache from: every
object that becomes present is logged with op 0, every condemnation with
op 1, and a revival with op 0 again. ``objects.condemned`` is 0 for a live
object; otherwise it is 1 + the number of the newest session that had begun
when it was condemned (sessions up to that number may still rely on it), and
the row is swept once every such session has ended.

The index can always be rebuilt from the packs' footers; ``epoch`` changes
when it is, so clients know to resync from scratch.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable

from pysrbup.errors import RepositoryError
from pysrbup.repo.wire import OP_ADD, OP_CONDEMN
from pysrbup.server.packs import RECORD, Entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    pack INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sealed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS objects (
    id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    condemned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects(pack);
CREATE TABLE IF NOT EXISTS idlog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL,
    op INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

#: SQLite's page cache, in KiB (a negative cache_size). Object ids are random, so
#: every insert lands on a random page of the objects table: with the default
#: 2 MiB a big index no longer fits and pages are written out and read back
#: within one commit. Measured inserting 200,000 ids in commits of 13,000 (what
#: a backup of 200,000 tiny files makes): 1.10 s of CPU instead of 1.79 s.
CACHE_KIB = 16 * 1024
#: Ids per ``IN (...)`` query (SQLite allows 32,766 parameters since 3.32; older, 999).
LOOKUP_BATCH = 999 if sqlite3.sqlite_version_info < (3, 32) else 4096

_DAMAGED = "the index {path} is damaged ({why}); run pysrbup-server --rebuild-index"


class Index:
    """Thread-safe access to the index database (one connection, one lock)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA cache_size={-CACHE_KIB}")
            self._db.executescript(SCHEMA)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise RepositoryError(_DAMAGED.format(path=path, why=exc)) from None
        if check != "ok":
            raise RepositoryError(_DAMAGED.format(path=path, why=check))
        self._lock = threading.RLock()
        if self.get_meta("epoch") is None:
            self.set_meta("epoch", os.urandom(8))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return result

    # ---- meta ------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def epoch(self) -> int:
        return int.from_bytes(self.get_meta("epoch") or b"\0", "little")

    # ---- packs -----------------------------------------------------------

    def add_pack(self, name: str) -> int:
        """Registers a new pack file and returns its number."""
        with self._lock:
            cur = self._db.execute("INSERT INTO packs(name) VALUES (?)", (name,))
            return int(cur.lastrowid)

    def mark_sealed(self, pack: int) -> None:
        with self._lock:
            self._db.execute("UPDATE packs SET sealed=1 WHERE pack=?", (pack,))

    def remove_pack(self, pack: int) -> bool:
        """Forgets a pack that no object points into any more; False if one still does."""

        def work(db):
            if db.execute("SELECT 1 FROM objects WHERE pack=? LIMIT 1", (pack,)).fetchone():
                return False
            db.execute("DELETE FROM packs WHERE pack=?", (pack,))
            return True

        return self._transaction(work)

    def packs(self) -> list[tuple[int, str, bool]]:
        with self._lock:
            rows = self._db.execute("SELECT pack, name, sealed FROM packs ORDER BY pack").fetchall()
        return [(int(p), str(n), bool(s)) for p, n, s in rows]

    def pack_names(self) -> list[str]:
        """The store names of every known pack."""
        return [name for _, name, _ in self.packs()]

    def remove_objects_of(self, pack: int) -> int:
        """Forgets every object of a pack that is gone for good; logs them condemned."""

        def work(db):
            rows = db.execute("SELECT id FROM objects WHERE pack=?", (pack,)).fetchall()
            db.executemany(
                "INSERT INTO idlog(id, op) VALUES (?, ?)", [(r[0], OP_CONDEMN) for r in rows]
            )
            db.execute("DELETE FROM objects WHERE pack=?", (pack,))
            return len(rows)

        return self._transaction(work)

    def pack_usage(self) -> dict[int, tuple[int, int]]:
        """Per pack: (object count, bytes its records take including headers)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pack, COUNT(*), SUM(length) FROM objects GROUP BY pack"
            ).fetchall()
        return {int(p): (int(c), int(s) + int(c) * RECORD.size) for p, c, s in rows}

    def pack_objects(self, pack: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, offset, length FROM objects WHERE pack=? ORDER BY offset", (pack,)
            ).fetchall()
        return [Entry(bytes(i), int(o), int(n)) for i, o, n in rows]

    def move_objects(self, old_pack: int, new_pack: int, entries: Iterable[Entry]) -> None:
        """Points objects copied by compaction at their new pack, in one transaction."""
        rows = [(new_pack, e.offset, e.length, e.oid, old_pack) for e in entries]

        def work(db):
            db.executemany(
                "UPDATE objects SET pack=?, offset=?, length=? WHERE id=? AND pack=?", rows
            )

        self._transaction(work)

    # ---- objects -----------------------------------------------------------

    def add_objects(self, pack: int, entries: Iterable[Entry]) -> int:
        """Adds entries in one transaction and logs them; known ids are kept as they are."""
        entries = list(entries)

        def work(db):
            # Usually every id is new (an upload checked them): two executemany calls.
            # Should any be known, the batch is undone and redone row by row.
            db.execute("SAVEPOINT add_objects")
            cur = db.executemany(
                "INSERT OR IGNORE INTO objects(id, pack, offset, length) VALUES (?,?,?,?)",
                [(e.oid, pack, e.offset, e.length) for e in entries],
            )
            if cur.rowcount == len(entries):
                db.executemany(
                    "INSERT INTO idlog(id, op) VALUES (?, ?)", [(e.oid, OP_ADD) for e in entries]
                )
                db.execute("RELEASE add_objects")
                return len(entries)
            db.execute("ROLLBACK TO add_objects")
            db.execute("RELEASE add_objects")
            added = 0
            for e in entries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO objects(id, pack, offset, length) VALUES (?,?,?,?)",
                    (e.oid, pack, e.offset, e.length),
                )
                if cur.rowcount:
                    db.execute("INSERT INTO idlog(id, op) VALUES (?, ?)", (e.oid, OP_ADD))
                    added += 1
            return added

        return self._transaction(work)

    def present_reviving_many(self, oids: list[bytes]) -> set[bytes]:
        """Which of ``oids`` are stored (one query per ``LOOKUP_BATCH``); condemned ones revived.

        For the ids of one upload frame: one query per batch, one transaction of revivals.
        """
        present: set[bytes] = set()
        condemned: list[bytes] = []
        with self._lock:
            for start in range(0, len(oids), LOOKUP_BATCH):
                part = oids[start : start + LOOKUP_BATCH]
                marks = ",".join("?" * len(part))
                for oid, dead in self._db.execute(
                    f"SELECT id, condemned FROM objects WHERE id IN ({marks})", part
                ):
                    present.add(oid)
                    if dead:
                        condemned.append(oid)
            if condemned:
                self.revive(condemned)
        return present

    def lookup_many(self, oids: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """Maps each known id to (pack, offset, length)."""
        found: dict[bytes, tuple[int, int, int]] = {}
        with self._lock:
            for start in range(0, len(oids), LOOKUP_BATCH):
                part = oids[start : start + LOOKUP_BATCH]
                marks = ",".join("?" * len(part))
                # The columns are typed (BLOB id, INTEGER rest): rows need no conversion.
                for row in self._db.execute(
                    f"SELECT id, pack, offset, length FROM objects WHERE id IN ({marks})", part
                ):
                    found[row[0]] = row[1:]
        return found

    def log_after(self, seq: int, limit: int, until: int) -> list[tuple[int, bytes, int]]:
        """Up to ``limit`` (seq, id, op) entries of the id log after ``seq``, up to ``until``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, op FROM idlog WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (seq, until, limit),
            ).fetchall()
        return [(int(s), bytes(i), int(o)) for s, i, o in rows]

    def last_seq(self) -> int:
        """The sequence number of the newest id-log entry (0 for an empty log)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM idlog").fetchone()
        return int(row[0] or 0)

    def condemned_after(self, seq: int) -> bool:
        """Whether anything was condemned after log position ``seq``."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM idlog WHERE seq > ? AND op = ? LIMIT 1", (seq, OP_CONDEMN)
            ).fetchone()
        return row is not None

    def condemn(self, oids: list[bytes], watermark: int) -> tuple[int, int]:
        """Condemns live objects among ``oids``; returns (count, bytes)."""

        def work(db):
            count = total = 0
            for oid in oids:
                row = db.execute(
                    "SELECT length FROM objects WHERE id=? AND condemned=0", (oid,)
                ).fetchone()
                if row is None:
                    continue
                db.execute("UPDATE objects SET condemned=? WHERE id=?", (watermark + 1, oid))
                db.execute("INSERT INTO idlog(id, op) VALUES (?, ?)", (oid, OP_CONDEMN))
                count += 1
                total += int(row[0]) + RECORD.size
            return count, total

        return self._transaction(work)

    def revive(self, oids: list[bytes]) -> list[bytes]:
        """Takes ``oids`` back from condemnation; returns those no longer stored."""

        def work(db):
            missing = []
            for oid in oids:
                row = db.execute("SELECT condemned FROM objects WHERE id=?", (oid,)).fetchone()
                if row is None:
                    missing.append(oid)
                elif row[0]:
                    db.execute("UPDATE objects SET condemned=0 WHERE id=?", (oid,))
                    db.execute("INSERT INTO idlog(id, op) VALUES (?, ?)", (oid, OP_ADD))
            return missing

        return self._transaction(work)

    def sweep(self, oldest_active_session: int | None) -> int:
        """Deletes condemned rows no running session can rely on; returns how many."""

        def work(db):
            if oldest_active_session is None:
                cur = db.execute("DELETE FROM objects WHERE condemned != 0")
            else:
                cur = db.execute(
                    "DELETE FROM objects WHERE condemned != 0 AND condemned <= ?",
                    (oldest_active_session,),
                )
            return cur.rowcount

        return self._transaction(work)

    def totals(self) -> tuple[int, int, int, int]:
        """(objects, their bytes, condemned objects, their bytes)."""
        with self._lock:
            objects, size = self._db.execute("SELECT COUNT(*), SUM(length) FROM objects").fetchone()
            condemned, dead = self._db.execute(
                "SELECT COUNT(*), SUM(length) FROM objects WHERE condemned != 0"
            ).fetchone()
        return int(objects), int(size or 0), int(condemned), int(dead or 0)

    def pending_condemned_bytes(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT SUM(length), COUNT(*) FROM objects WHERE condemned != 0"
            ).fetchone()
        return int(row[0] or 0) + int(row[1]) * RECORD.size
