"""Garbage collection on the server: sweeping condemned objects and compacting packs.

The client decides what is garbage (only it can read trees); this layer
decides when removing it is safe (docs/design.md §12) and gets the space
back: a pack with no live object is deleted, one with more than 5 % dead
bytes is rewritten as a new pack object (uploaded and given parity first),
then the old one is deleted. Nothing is modified in place.
"""

from __future__ import annotations

import logging
import threading

from pysrbup.server import packs
from pysrbup.server.index import Index
from pysrbup.server.packstore import PackStore
from pysrbup.server.parity import Parity
from pysrbup.server.sessions import Sessions

#: A sealed pack is rewritten once this fraction of it is garbage.
COMPACT_DEAD_FRACTION = 0.05
log = logging.getLogger("pysrbup.server")


class Collector:
    """Sweeps and compacts one repository's packs."""

    def __init__(
        self,
        index: Index,
        pack_store: PackStore,
        parity: Parity,
        sessions: Sessions,
        pack_lock: threading.RLock,
    ):
        self.index = index
        self.pack_store = pack_store
        self.parity = parity
        self.sessions = sessions
        self.pack_lock = pack_lock
        #: Held while condemning, committing and sweeping (docs/design.md §12).
        self.lock = threading.Lock()

    def collect(self, force: bool = False) -> int:
        """Sweeps condemned objects no session relies on and compacts packs; bytes freed.

        Packs are only examined when the sweep removed something (or ``force``),
        so the commits and session ends that call this stay cheap.
        """
        self.sessions.reap_idle()  # a client that died must not hold sweeps back forever
        with self.lock:
            swept = self.index.sweep(self.sessions.oldest_active())
            if not swept and not force:
                return 0
            return self.compact()

    def compact(self) -> int:
        usage = self.index.pack_usage()
        open_packs = self.sessions.open_packs()
        sizes = None
        freed = 0
        for pack, name, sealed in self.index.packs():
            if not sealed or pack in open_packs:
                continue
            count, used = usage.get(pack, (0, 0))
            with self.pack_lock:
                if count == 0:
                    freed += self.pack_store.drop(pack)
                    continue
                if sizes is None:  # one listing instead of a request per pack
                    sizes = dict(self.pack_store.store.list("packs"))
                size = sizes.get(name, 0)
                live = packs.HEADER.size + used + count * packs.ENTRY.size + packs.TRAILER.size
                if size - live > COMPACT_DEAD_FRACTION * size:
                    freed += self._rewrite(pack, name, size)
        return freed

    def _rewrite(self, pack: int, name: str, size: int) -> int:
        """Copies a pack's live records into a new pack object, then drops the old one."""
        entries = self.index.pack_objects(pack)
        try:
            data = memoryview(self.pack_store.store.get(name))
        except FileNotFoundError:
            log.error("not compacting %s: it is missing", name)
            return 0
        new_pack, writer = self.pack_store.create()
        moved = []
        for entry in entries:
            start = entry.offset - packs.RECORD.size
            payload = packs.check_record(
                data[start : entry.offset + entry.length], entry.length, entry.oid
            )
            if payload is None:
                log.error("not compacting %s: record %s is damaged", name, entry.oid.hex())
                self.pack_store.abandon(new_pack, writer)
                return 0
            moved.append(writer.append(entry.oid, payload))
        self.pack_store.seal(new_pack, writer, wait=True)  # in the store before the old goes
        new_name = self.pack_store.names[new_pack]
        if self.parity.level is not None:  # protected before the old copy goes
            self.parity.protect(new_name)
        self.index.move_objects(pack, new_pack, moved)
        return max(0, self.pack_store.drop(pack) - writer.size)
