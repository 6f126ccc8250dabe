"""The local set of ids the repository holds, synced from the server's id log.

Before a backup the client asks only for ids logged after the last sequence
number it saw, appends them to ``ids`` in the repository's cache folder and
keeps them in memory. A chunk whose id is in the set is not uploaded. (Deciding
that needs no request; the existence check before a commit, in backup.py,
does name the reused ids to the server.)

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
from pysrbup.repo.wire import ID_SIZE, OP_CONDEMN


class IdCache:
    """Known ids of one repository (in memory, persisted in the cache folder)."""

    def __init__(self, repo_id: bytes):
        self.folder = repo_cache_dir(repo_id)
        self._ids_path = os.path.join(self.folder, "ids")
        self._state_path = os.path.join(self.folder, "ids.state")
        self.ids: set[bytes] = set()
        self.epoch = -1
        self.last_seq = 0

    def _load(self) -> None:
        try:
            with open(self._state_path, encoding="utf-8") as handle:
                state = json.load(handle)
            epoch, last_seq, count = (
                int(state["epoch"]),
                int(state["last_seq"]),
                int(state["count"]),
            )
            with open(self._ids_path, "rb") as handle:
                blob = handle.read(count * ID_SIZE)
            if len(blob) != count * ID_SIZE:
                raise ValueError("short ids file")
        except (OSError, ValueError, KeyError, TypeError):
            self._reset()
            return
        self.epoch, self.last_seq = epoch, last_seq
        self.ids = {blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)}

    def _reset(self) -> None:
        self.ids, self.epoch, self.last_seq = set(), -1, 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._state_path)
        with open(self._ids_path, "wb"):
            pass

    def _save_state(self) -> None:
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(
                {"epoch": self.epoch, "last_seq": self.last_seq, "count": len(self.ids)}, handle
            )
        os.replace(tmp, self._state_path)

    def sync(self, conn: Connection) -> list[bytes]:
        """Brings the set up to date with the server's id log, up to where it is now.

        Returns the ids condemned (garbage-collected) in the part of the log
        read now, so a running backup can revive the ones it relies on.
        """
        info = conn.info()
        epoch = info.id_log_epoch
        condemned: list[bytes] = []
        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            if self.epoch != epoch:
                self._reset()
                self.epoch = epoch
            rewrite = False
            with open(self._ids_path, "r+b") as handle:
                handle.truncate(len(self.ids) * ID_SIZE)
                handle.seek(0, os.SEEK_END)
                for batch in conn.sync_ids(self.last_seq, info.id_log_last_seq):
                    blob, ops = batch.ids, batch.ops
                    fresh = []
                    for n in range(len(blob) // ID_SIZE):
                        oid = blob[n * ID_SIZE : (n + 1) * ID_SIZE]
                        if n < len(ops) and ops[n] == OP_CONDEMN:
                            condemned.append(oid)
                            if oid in self.ids:
                                self.ids.discard(oid)
                                rewrite = True
                        elif oid not in self.ids:
                            self.ids.add(oid)
                            fresh.append(oid)
                    if not rewrite:
                        handle.write(b"".join(fresh))
                    self.last_seq = batch.last_seq
            if rewrite:  # removals are rare (after a delete): write the whole set anew
                self._rewrite()
            self._save_state()
        return condemned

    def _rewrite(self) -> None:
        tmp = self._ids_path + ".tmp"
        with open(tmp, "wb") as handle:
            handle.write(b"".join(self.ids))
        os.replace(tmp, self._ids_path)

    def discard(self, oids: list[bytes]) -> None:
        """Forgets ids the server listed but does not hold, so they are uploaded again."""
        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            self.ids.difference_update(oids)
            self._rewrite()
            self._save_state()
