"""The repository's small objects in the store: config, session keys, snapshot records.

All of them live in the blob store (the source of truth), each written once
and whole, so a new server pointed at the same store serves the same
repository. Session keys and snapshot records never change once written:
what was read is kept in memory, and only the listing is asked again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

from pysrbup.errors import RepositoryError
from pysrbup.repo import wire
from pysrbup.server import blobstore, snapshot_store
from pysrbup.server.blobstore import BlobNotFoundError, BlobStore

FORMAT = "pysrbup-repo"
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{16}$")
KEY_NAME = re.compile(r"^[0-9a-f]{32}$")
log = logging.getLogger("pysrbup.server")


def new_config() -> dict:
    """The config of a new, uninitialised repository (docs/design.md §8.2)."""
    return {
        "format": FORMAT,
        "version": wire.FORMAT_VERSION,
        "repo_id": os.urandom(16).hex(),
        "created": time.time(),
        "write_public_key": None,
        "destroy_public_key": None,
    }


class Records:
    """Config, session keys, snapshot records and deletion markers of one store."""

    def __init__(self, store: BlobStore):
        self.store = store
        self._keys: dict[str, bytes] = {}
        self._snapshots: dict[str, snapshot_store.StoredSnapshot] = {}
        self._lock = threading.Lock()

    # ---- config ---------------------------------------------------------------------

    def load_config(self) -> dict | None:
        """The stored config, or None if there is none; RepositoryError if it is damaged."""
        where = f"{self.store.location}/{blobstore.CONFIG}"
        try:
            raw = self.store.get(blobstore.CONFIG)
        except BlobNotFoundError:
            return None
        try:
            config = json.loads(raw)
            if config.get("format") != FORMAT:
                raise ValueError("not a pysrbup repository")
            if config.get("version") != wire.FORMAT_VERSION:
                raise ValueError(f"unsupported repository version {config.get('version')}")
            bytes.fromhex(config["repo_id"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{where} is damaged or not a pysrbup config: {exc}") from None
        return config

    def save_config(self, config: dict) -> None:
        self.store.put(blobstore.CONFIG, json.dumps(config, indent=2).encode())

    # ---- session keys -----------------------------------------------------------------

    def put_session_key(self, key_id: bytes, wrapped: bytes) -> None:
        """Stores a wrapped session key once (a second put of the same id is a no-op)."""
        name = key_id.hex()
        with self._lock:
            if name in self._keys:
                return
        path = f"{blobstore.KEYS}/{name}"
        if self.store.stat(path) is None:
            self.store.put(path, wrapped)
        with self._lock:
            self._keys[name] = bytes(wrapped)

    def session_keys(self) -> list[tuple[bytes, bytes]]:
        """Every stored (key id, wrapped key), sorted by id."""
        found = []
        for path, _ in self.store.list(blobstore.KEYS):
            name = path.rsplit("/", 1)[-1]
            if not KEY_NAME.match(name):
                continue
            with self._lock:
                wrapped = self._keys.get(name)
            if wrapped is None:
                try:
                    wrapped = self.store.get(path, 0, wire.MAX_WRAPPED_KEY)
                except BlobNotFoundError:
                    continue
                with self._lock:
                    self._keys[name] = wrapped
            found.append((bytes.fromhex(name), wrapped))
        found.sort()
        return found

    # ---- snapshot records -------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        """The ids of every stored snapshot record."""
        names = (path.rsplit("/", 1)[-1] for path, _ in self.store.list(blobstore.SNAPSHOTS))
        return sorted(name for name in names if SNAPSHOT_ID.match(name))

    def read_snapshot(self, snapshot_id: str) -> snapshot_store.StoredSnapshot:
        """One record; FileNotFoundError if there is none, RepositoryError if damaged."""
        with self._lock:
            cached = self._snapshots.get(snapshot_id)
        if cached is not None:
            return cached
        data = self.store.get(
            f"{blobstore.SNAPSHOTS}/{snapshot_id}",
            0,
            wire.MAX_SNAPSHOT_RECORD + snapshot_store.HEADER.size + 1,
        )
        stored = snapshot_store.decode(snapshot_id, data)
        with self._lock:
            self._snapshots[snapshot_id] = stored
        return stored

    def snapshots(self) -> list[snapshot_store.StoredSnapshot]:
        """Every snapshot record, oldest first (a damaged one is logged and skipped)."""
        stored = []
        for snapshot_id in self.snapshot_ids():
            try:
                stored.append(self.read_snapshot(snapshot_id))
            except FileNotFoundError:
                continue  # deleted meanwhile
            except RepositoryError as exc:
                log.error("%s", exc)
        stored.sort(key=lambda s: (s.created_ns, s.snapshot_id))
        return stored

    def write_snapshot(self, stored: snapshot_store.StoredSnapshot) -> None:
        self.store.put(f"{blobstore.SNAPSHOTS}/{stored.snapshot_id}", snapshot_store.encode(stored))
        with self._lock:
            self._snapshots[stored.snapshot_id] = stored

    def delete_snapshot(self, snapshot_id: str) -> bool:
        """Marks the id deleted for good, then removes its record; False if there was none."""
        name = f"{blobstore.SNAPSHOTS}/{snapshot_id}"
        with self._lock:
            self._snapshots.pop(snapshot_id, None)
        if self.store.stat(name) is None:
            return False
        self.store.put(f"{blobstore.DELETED}/{snapshot_id}", b"1")  # first: a crash finishes it
        self.store.delete(name)
        return True

    def deleted_ids(self) -> list[str]:
        """Every id marked deleted (kept in the store so a rebuilt index refuses them too)."""
        names = (path.rsplit("/", 1)[-1] for path, _ in self.store.list(blobstore.DELETED))
        return sorted(name for name in names if SNAPSHOT_ID.match(name))
