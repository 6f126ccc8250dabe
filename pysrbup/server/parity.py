"""Parity over any blob store: the ``ecc`` codec applied to pack objects.

Like kopia's ECC wrapping a storage, this layer knows nothing of where the
bytes live: a sealed pack object ``packs/<hh>/<id>.pack`` gets a sidecar
object ``packs/<hh>/<id>.ecc`` computed from its bytes, and a check reads
both, rebuilds what parity allows, and stores the repaired objects whole
(a pack's original sealed bytes replace the damaged ones; nothing is
patched in place).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pysrbup.errors import PysrbupError
from pysrbup.server import blobstore, ecc, packs
from pysrbup.server.blobstore import BlobNotFoundError, BlobStore
from pysrbup.server.index import Index

log = logging.getLogger("pysrbup.server")
#: The parity worker frees its reused buffers (about twice a pack) after this long idle.
WORKSPACE_IDLE_SECONDS = 5.0


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


@dataclass
class _Marker:
    done: threading.Event


class Parity:
    """Writes, checks and repairs the sidecars of the packs in one store."""

    def __init__(
        self,
        store: BlobStore,
        level: ecc.EccLevel | None,
        pack_lock: threading.RLock,
        alive: Callable[[str], bool] = lambda name: True,
    ):
        self.store = store
        self.level = level
        self.pack_lock = pack_lock
        self._alive = alive
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._workspace = ecc.Workspace()
        self._workspace_lock = threading.Lock()

    def protect(self, name: str, data: bytes | None = None) -> bool:
        """Writes the sidecar of a sealed pack if every record verifies; True once stored.

        Parity over rotten data would make the rot permanent, so a pack that
        fails here is logged ("detected data corruption") and left unprotected.
        """
        if self.level is None:
            return False
        with self._workspace_lock:  # one pack at a time in the reused buffers
            if data is None:
                data = self._read(name)
            sidecar, problem = ecc.encode(
                data, self.level, verify=packs.damaged_in, workspace=self._workspace
            )
            del data  # (a view of the workspace)
        if problem:
            log.error(
                "detected data corruption in %s (%s); not writing parity over it", name, problem
            )
            return False
        self.store.put(blobstore.parity_name(name), sidecar)
        return True

    def _read(self, name: str) -> bytes | memoryview:
        """A pack's bytes, read into the reused buffer where the store can."""
        return self.store.get_into(name, lambda size: self._workspace.take("pack", size))

    def queue(self, name: str, data: bytes | None = None) -> None:
        """Protects a pack in the background (off the upload's critical path)."""
        if self.level is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="pysrbup-ecc", daemon=True)
            self._thread.start()
        self._queue.put((name, data if self._queue.qsize() < 4 else None))

    def _worker(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=WORKSPACE_IDLE_SECONDS)
            except queue.Empty:  # a backup's packs shared the buffers; idle, none are kept
                with self._workspace_lock:
                    self._workspace.clear()
                job = self._queue.get()
            if job is None:
                return
            if isinstance(job, _Marker):
                job.done.set()
                continue
            name, data = job
            try:
                with self.pack_lock:  # compaction must not drop the pack meanwhile
                    if self._alive(name) and self.store.stat(blobstore.parity_name(name)) is None:
                        self.protect(name, data)
            except BlobNotFoundError:
                continue
            except (PysrbupError, OSError, ValueError) as exc:
                log.error("cannot write parity for %s: %s", name, exc)

    def wait(self) -> None:
        """Blocks until every queued sidecar is written (tests, scrub)."""
        if self._thread is not None:
            done = threading.Event()
            self._queue.put(_Marker(done))
            while not done.wait(0.2) and self._thread.is_alive():
                pass

    def check(self, name: str, repair: bool = True) -> ecc.PackCheck:
        """Verifies a pack object against its sidecar; stores what could be repaired.

        BlobNotFoundError if the pack itself is missing.
        """
        data = self.store.get(name)
        try:
            sidecar = self.store.get(blobstore.parity_name(name))
        except BlobNotFoundError:
            sidecar = None
        repaired = ecc.check(data, sidecar, name)
        if repair:
            if repaired.pack is not None:
                self.store.put(name, repaired.pack)
            if repaired.sidecar is not None:
                self.store.put(blobstore.parity_name(name), repaired.sidecar)
        return repaired.check

    def scrub(self, index: Index) -> ScrubReport:
        """Checks every sealed pack against its parity, repairs, and reports what is lost.

        A pack without a sidecar is verified record by record and protected if
        every record is intact.
        """
        report = ScrubReport()
        for pack, name, sealed in index.packs():
            if not sealed:
                continue
            with self.pack_lock:
                try:
                    result = self.check(name)
                except FileNotFoundError:
                    lost = [e.oid for e in index.pack_objects(pack)]
                    if lost:  # deleted behind the server's back
                        log.error("pack %s is missing: its objects are lost", name)
                        report.packs += 1
                        report.damaged[name] = lost
                    continue
                entries = index.pack_objects(pack)
                if result.unprotected:
                    report.packs_unprotected += 1
                    data = memoryview(self.store.get(name))
                    bad_ids = [
                        e.oid
                        for e in entries
                        if packs.check_record(
                            data[e.offset - packs.RECORD.size : e.offset + e.length],
                            e.length,
                            e.oid,
                        )
                        is None
                    ]
                    report.records_checked += len(entries)
                    if (  # e.g. a deleted sidecar
                        not bad_ids and self.level is not None and self.protect(name)
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
        return report

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
