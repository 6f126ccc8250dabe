"""The SQLite index: object id -> (pack, offset, length), plus the id log.

The ``seq`` column doubles as the append-only id log clients sync from:
ids are only ever added with a larger seq. The index can always be rebuilt
from the packs' footers; ``epoch`` changes when it is, so clients know to
resync from scratch.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator

from pysrbup.errors import RepositoryError
from pysrbup.server.packs import Entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    pack INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sealed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS objects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL UNIQUE,
    pack INTEGER NOT NULL REFERENCES packs(pack),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


class Index:
    """Thread-safe access to the index database (one connection, one lock)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise RepositoryError(
                f"the index {path} is damaged ({exc}); run pysrbup-server --rebuild-index"
            ) from None
        if check != "ok":
            raise RepositoryError(
                f"the index {path} is damaged ({check}); run pysrbup-server --rebuild-index"
            )
        self._lock = threading.Lock()
        if self.get_meta("epoch") is None:
            self.set_meta("epoch", os.urandom(8))

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

    def add_pack(self, name: str) -> int:
        """Registers a new pack file and returns its number."""
        with self._lock:
            cur = self._db.execute("INSERT INTO packs(name) VALUES (?)", (name,))
            return int(cur.lastrowid)

    def mark_sealed(self, pack: int) -> None:
        with self._lock:
            self._db.execute("UPDATE packs SET sealed=1 WHERE pack=?", (pack,))

    def packs(self) -> list[tuple[int, str, bool]]:
        with self._lock:
            rows = self._db.execute("SELECT pack, name, sealed FROM packs ORDER BY pack").fetchall()
        return [(int(p), str(n), bool(s)) for p, n, s in rows]

    def add_objects(self, pack: int, entries: Iterable[Entry]) -> int:
        """Adds entries in one transaction; ids already indexed are kept as they are."""
        rows = [(e.oid, pack, e.offset, e.length) for e in entries]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO objects(id, pack, offset, length) VALUES (?,?,?,?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def contains(self, oid: bytes) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM objects WHERE id=?", (oid,)).fetchone()
        return row is not None

    def lookup_many(self, oids: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """Maps each known id to (pack, offset, length)."""
        found: dict[bytes, tuple[int, int, int]] = {}
        with self._lock:
            for start in range(0, len(oids), 500):
                part = oids[start : start + 500]
                marks = ",".join("?" * len(part))
                for oid, pack, offset, length in self._db.execute(
                    f"SELECT id, pack, offset, length FROM objects WHERE id IN ({marks})", part
                ):
                    found[bytes(oid)] = (int(pack), int(offset), int(length))
        return found

    def ids_after(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (seq, id) pairs of the id log after ``seq``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id FROM objects WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        return [(int(s), bytes(i)) for s, i in rows]

    def iter_ids(self) -> Iterator[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM objects ORDER BY seq").fetchall()
        for (oid,) in rows:
            yield bytes(oid)

    def stats(self) -> tuple[int, int]:
        """(object count, payload bytes)."""
        with self._lock:
            count, total = self._db.execute("SELECT COUNT(*), SUM(length) FROM objects").fetchone()
        return int(count), int(total or 0)
