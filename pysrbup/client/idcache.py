"""The local set of ids the repository holds, synced from the server's id log.

Before a backup the client asks only for ids logged after the last sequence
number it saw, appends them to ``ids`` in the repository's cache folder and
keeps them in memory (an ``IdSet``, 40 bytes an id). A chunk whose id is in
the set is not uploaded. (Deciding that needs no request; the existence check
before a commit, in backup.py, names a sample of the reused ids to the server.)

Files: ``ids`` (concatenated 32-byte ids) and ``ids.state`` (JSON: epoch,
last seq, count). A crash between the two leaves extra bytes in ``ids``,
which the next load cuts off; an epoch change (rebuilt index) resets both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from pysrbup.client.cache import repo_cache_dir
from pysrbup.client.connection import Connection
from pysrbup.client.idset import IdSet
from pysrbup.fileio import read_into
from pysrbup.repo.wire import ID_SIZE, OP_CONDEMN


class IdCache:
    """Known ids of one repository (in memory as an ``IdSet``, persisted in the cache folder)."""

    def __init__(self, repo_id: bytes):
        self.folder = repo_cache_dir(repo_id)
        self._ids_path = os.path.join(self.folder, "ids")
        self._state_path = os.path.join(self.folder, "ids.state")
        self.ids = IdSet()
        self.epoch = -1
        self.last_seq = 0
        self._rows = 0  # 32-byte rows in ``ids`` (repeats included)

    def _load(self) -> None:
        """Reads the state (the set itself is made by ``_read_set``)."""
        try:
            with open(self._state_path, encoding="utf-8") as handle:
                state = json.load(handle)
            epoch, last_seq, count = (
                int(state["epoch"]),
                int(state["last_seq"]),
                int(state["count"]),
            )
            if count < 0 or os.path.getsize(self._ids_path) < count * ID_SIZE:
                raise ValueError("short ids file")
        except (OSError, ValueError, KeyError, TypeError):
            self._reset()
            return
        self.epoch, self.last_seq, self._rows = epoch, last_seq, count

    def _read_set(self) -> IdSet:
        rows = bytearray(self._rows * ID_SIZE)  # sorted in place: one copy of the ids
        with open(self._ids_path, "rb") as handle, memoryview(rows) as view:
            got = read_into(handle.readinto, view)
        del rows[got - got % ID_SIZE :]
        return IdSet(rows)

    def _reset(self) -> None:
        self.ids, self.epoch, self.last_seq, self._rows = IdSet(), -1, 0, 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._state_path)
        with open(self._ids_path, "wb"):
            pass

    def _save_state(self) -> None:
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"epoch": self.epoch, "last_seq": self.last_seq, "count": self._rows}, handle)
        os.replace(tmp, self._state_path)

    def sync(self, conn: Connection, make_set: bool = True) -> list[bytes]:
        """Brings the set up to date with the server's id log, up to where it is now.

        Returns the ids condemned (garbage-collected) in the log after this
        object's previous sync (a new object: after the folder's position),
        so a running backup can revive the ones it relies on. The folder is
        shared by every client of the machine: when another one brought it
        further meanwhile, the log is read again from our own position, or
        the condemnations in between would go unseen (replaying entries
        already applied leaves the set as it is). Added ids are appended to
        the file as they come (the set is made once, at the end); an id
        condemned and not added again later in the log is dropped, which
        rewrites the file, as repeats do. With ``make_set`` False (a commit,
        which wants only the condemnations) the set is not made again unless
        ids were dropped, and ``ids`` is left as it was.
        """
        info = conn.info()
        epoch = info.id_log_epoch
        own = self.last_seq if self.epoch == epoch else None
        condemned: list[bytes] = []
        gone: set[bytes] = set()  # condemned, and not added again after that
        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            if self.epoch != epoch:
                self._reset()
                self.epoch = epoch
            start = self.last_seq if own is None else min(own, self.last_seq)
            until = max(info.id_log_last_seq, self.last_seq)  # never back behind the folder
            with open(self._ids_path, "r+b") as handle:
                handle.truncate(self._rows * ID_SIZE)
                handle.seek(0, os.SEEK_END)
                for batch in conn.sync_ids(start, until):
                    blob, ops = batch.ids, batch.ops
                    fresh = blob
                    if gone or OP_CONDEMN in ops:
                        kept = []
                        for n in range(len(blob) // ID_SIZE):
                            oid = blob[n * ID_SIZE : (n + 1) * ID_SIZE]
                            if ops[n] == OP_CONDEMN:
                                condemned.append(oid)
                                gone.add(oid)
                            else:
                                gone.discard(oid)
                                kept.append(oid)
                        fresh = b"".join(kept)
                    handle.write(fresh)
                    self._rows += len(fresh) // ID_SIZE
                    self.last_seq = batch.last_seq
            if make_set or gone:
                ids = self._read_set()
                if gone or len(ids) != self._rows:  # drops, or repeats worth squeezing out
                    ids = ids.without(gone)
                    self._write_all(ids)
                self.ids = ids
            self._save_state()
        return condemned

    def _write_all(self, ids: IdSet) -> None:
        tmp = self._ids_path + ".tmp"
        with open(tmp, "wb") as handle:
            handle.write(ids.view())
        os.replace(tmp, self._ids_path)
        self._rows = len(ids)

    def discard(self, oids: list[bytes]) -> None:
        """Forgets ids the server listed but does not hold, so they are uploaded again."""
        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            self.ids = self._read_set().without(oids)
            self._write_all(self.ids)
            self._save_state()
