"""The index is a cache of the store: rebuilding it from the packs' footers.

Every pack object ends with a footer listing its records (docs/design.md
§9.1), so the SQLite index on the server's disk can be rebuilt from the
store alone: two ranged reads per pack (the trailer, then the footer), a
whole read only for a pack without a valid footer. Deletion markers come
from the store's ``deleted/`` objects.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

from pysrbup.errors import RepositoryError
from pysrbup.server import blobstore, packs
from pysrbup.server.blobstore import BlobStore, LocalStore
from pysrbup.server.index import Index
from pysrbup.server.parity import Parity
from pysrbup.server.records import Records

INDEX = "index.sqlite"
log = logging.getLogger("pysrbup.server")


def flock(root: str, what: str) -> int:
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RepositoryError(f"{root} is {what}") from None
    return fd


def index_store(store: BlobStore, index: Index, records: Records, verify: bool) -> tuple[int, int]:
    """Indexes every pack in the store from its footer (two ranged reads per pack).

    With ``verify`` every pack is first checked and repaired from parity. A
    pack without a valid footer is read whole and its intact records indexed.
    Deletion markers are restored from the store too.
    """
    count_packs = count_objects = 0
    parity = Parity(store, None, threading.RLock())
    sizes = dict(store.list(blobstore.PACKS))
    names = sorted(name for name in sizes if name.endswith(blobstore.PACK_SUFFIX))
    for name in names:
        if verify:
            try:
                parity.check(name)
            except (RepositoryError, OSError) as exc:
                log.error("cannot verify %s: %s", name, exc)
        entries = _footer_entries(store, name, sizes[name])
        if entries is None:
            try:
                data = store.get(name)
            except (RepositoryError, OSError) as exc:
                log.error("skipping %s: %s", name, exc)
                continue
            entries = packs.scan_bytes(data)
            if not entries and not data.startswith(packs.MAGIC):
                log.error("skipping %s: not a pysrbup pack", name)
                continue
        pack = index.add_pack(name)
        count_objects += index.add_objects(pack, entries)
        index.mark_sealed(pack)
        count_packs += 1
    for snapshot_id in records.deleted_ids():
        index.set_meta("deleted:" + snapshot_id, b"1")
    return count_packs, count_objects


def _footer_entries(store: BlobStore, name: str, size: int) -> list[packs.Entry] | None:
    where = packs.parse_trailer(
        store.get(name, size - packs.TRAILER.size, packs.TRAILER.size), size
    )
    if where is None:
        return None
    offset, count, digest = where
    return packs.parse_footer(store.get(name, offset, count * packs.ENTRY.size), count, digest)


def rebuild_index(root: str, store: BlobStore | None = None) -> tuple[int, int]:
    """Rebuilds the index from the packs' own footers in the store; returns (packs, objects).

    The old index is kept beside as ``index.sqlite.broken-<time>``. Packs are
    verified (and repaired from parity) first; a pack left staged by a crash is
    recovered up to its last intact record at the next start.
    """
    root = os.path.abspath(root)
    store = store if store is not None else LocalStore(root)
    if store.local_root == root and not os.path.isdir(os.path.join(root, "packs")):
        raise RepositoryError(f"{root} is not a pysrbup repository")
    os.makedirs(root, exist_ok=True)
    lock_fd = flock(root, "in use by a running pysrbup-server")
    try:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = os.path.join(root, INDEX + suffix)
            if os.path.exists(old):
                os.replace(old, os.path.join(root, f"{INDEX}.broken-{stamp}{suffix}"))
        index = Index(os.path.join(root, INDEX))
        try:
            return index_store(store, index, Records(store), verify=True)
        finally:
            index.close()
    finally:
        os.close(lock_fd)
