"""Pack objects over a blob store: staged on the local disk while written, uploaded whole.

A pack is assembled in ``<local dir>/staging/<pack id>.pack`` (appended,
fsynced at every sync: that fsync is where an upload is acknowledged), sealed
with its footer, then uploaded as one object ``packs/<hh>/<pack id>.pack``
by a background thread and its staging file removed. The index marks a pack
``sealed`` only once it is in the store; until then it is read from staging.
After a crash, ``recover`` seals what staging holds and uploads it. Nothing
is ever written into an object in the store: compaction and repair write new
objects (or a whole replacement) and delete old ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable

from pysrbup.errors import PysrbupError, RepositoryError
from pysrbup.server import blobstore, packs
from pysrbup.server.blobstore import BlobStore
from pysrbup.server.index import Index

log = logging.getLogger("pysrbup.server")
STAGING = "staging"


class PackStore:
    """Creates, stages, uploads, reads and drops the packs of one repository."""

    def __init__(
        self,
        store: BlobStore,
        local_dir: str,
        index: Index,
        on_uploaded: Callable[[str, bytes | None], None] = lambda name, data: None,
        keep_data: bool = False,
    ):
        self.store = store
        self.index = index
        self.staging_dir = os.path.join(local_dir, STAGING)
        os.makedirs(self.staging_dir, exist_ok=True)
        self.names: dict[int, str] = {p: name for p, name, _ in index.packs()}
        self.staged: dict[int, str] = {}
        self._on_uploaded = on_uploaded
        self._keep_data = keep_data
        self._lock = threading.Condition()
        self._pending: set[int] = set()
        self._failed: dict[int, str] = {}
        self._fds: dict[int, int] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def staging_path(self, name: str) -> str:
        return os.path.join(self.staging_dir, name.rsplit("/", 1)[-1])

    # ---- writing -------------------------------------------------------------------

    def create(self) -> tuple[int, packs.PackWriter]:
        """A new pack: its number in the index and a writer on its staging file."""
        pack_id = os.urandom(packs.PACK_ID_SIZE)
        name = blobstore.pack_name(pack_id.hex())
        pack = self.index.add_pack(name)
        path = self.staging_path(name)
        with self._lock:
            self.names[pack] = name
            self.staged[pack] = path
        return pack, packs.PackWriter(path, pack_id)

    def seal(self, pack: int, writer: packs.PackWriter, wait: bool = False) -> None:
        """Seals a staged pack and uploads it (in the background unless ``wait``)."""
        writer.seal()
        if wait:
            self.upload(pack)
            return
        with self._lock:
            self._pending.add(pack)
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="pysrbup-upload", daemon=True)
            self._thread.start()
        self._queue.put(pack)

    def _worker(self) -> None:
        while True:
            pack = self._queue.get()
            if pack is None:
                return
            try:
                self.upload(pack)
            except (PysrbupError, OSError) as exc:
                log.error("cannot upload pack %s: %s", self.names.get(pack), exc)
                with self._lock:
                    self._failed[pack] = str(exc)
            finally:
                with self._lock:
                    self._pending.discard(pack)
                    self._lock.notify_all()

    def upload(self, pack: int) -> None:
        """Puts a sealed staged pack into the store, marks it sealed, drops its staging file."""
        with self._lock:
            path = self.staged.get(pack)
            name = self.names[pack]
        if path is None:
            return
        data = None
        if self._keep_data:
            with open(path, "rb") as handle:
                data = handle.read()
        self.store.put_file(name, path)
        self.index.mark_sealed(pack)
        with self._lock:
            self.staged.pop(pack, None)
            self._failed.pop(pack, None)
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._on_uploaded(name, data)

    def flush(self) -> None:
        """Returns once every sealed pack is in the store (retrying failed uploads once)."""
        with self._lock:
            while self._pending:
                self._lock.wait()
            failed = list(self._failed)
        for pack in failed:
            self.upload(pack)  # raises if the store still refuses it

    def abandon(self, pack: int, writer: packs.PackWriter) -> None:
        """Forgets a pack that was never used (compaction gave up on it)."""
        writer.abandon()
        with self._lock:
            path = self.staged.pop(pack, None)
            self.names.pop(pack, None)
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.index.remove_pack(pack)

    # ---- reading -------------------------------------------------------------------

    def read(self, pack: int, offset: int, length: int) -> bytes:
        """``length`` bytes of a pack from ``offset`` (short at its end)."""
        with self._lock:
            path = self.staged.get(pack)
            name = self.names.get(pack)
        if path is not None:
            try:
                return os.pread(self._staged_fd(pack, path), length, offset)
            except FileNotFoundError:
                pass  # uploaded meanwhile
        if name is None:
            raise blobstore.BlobNotFoundError(f"no pack number {pack}")
        return self.store.get(name, offset, length)

    def _staged_fd(self, pack: int, path: str) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[pack] = fd
            return fd

    def exists(self, pack: int) -> bool:
        """Whether the pack's bytes are anywhere (staging or the store)."""
        with self._lock:
            if pack in self.staged:
                return True
            name = self.names.get(pack)
        return bool(name) and self.store.stat(name) is not None

    # ---- dropping ------------------------------------------------------------------

    def drop(self, pack: int) -> int:
        """Deletes a pack no object points into (and its parity); bytes freed, 0 if refused."""
        name = self.names.get(pack)
        if name is None or not self.index.remove_pack(pack):
            return 0
        freed = 0
        for target in (name, blobstore.parity_name(name)):
            size = self.store.stat(target)
            if size is not None:
                freed += size
                self.store.delete(target)
        with self._lock:
            self.names.pop(pack, None)
        return freed

    # ---- recovery ------------------------------------------------------------------

    def recover(self) -> None:
        """Finishes what a crash interrupted: seals staged packs, indexes and uploads them."""
        for pack, name, sealed in self.index.packs():
            if sealed:
                continue
            path = self.staging_path(name)
            legacy = self.store.local_root and os.path.join(self.store.local_root, *name.split("/"))
            if not os.path.exists(path) and legacy and os.path.exists(legacy):
                path = legacy  # written in place by an older server
            if os.path.exists(path):
                try:
                    entries = packs.recover(path)
                except RepositoryError:
                    os.unlink(path)
                    self.index.remove_objects_of(pack)
                    self.index.remove_pack(pack)
                    continue
                self.index.add_objects(pack, entries)
                if path == legacy:
                    self.index.mark_sealed(pack)
                    continue
                with self._lock:
                    self.staged[pack] = path
                self.upload(pack)
            elif self.store.stat(name) is not None:  # uploaded, not yet marked
                self.index.mark_sealed(pack)
            else:  # created, never written: nothing to keep
                self.index.remove_objects_of(pack)
                self.index.remove_pack(pack)
        known = {name: sealed for _, name, sealed in self.index.packs()}
        for entry in sorted(os.listdir(self.staging_dir)):
            path = os.path.join(self.staging_dir, entry)
            if not entry.endswith(blobstore.PACK_SUFFIX):
                os.unlink(path)  # a temporary
                continue
            name = blobstore.pack_name(entry.removesuffix(blobstore.PACK_SUFFIX))
            if name in known:
                if known[name]:  # uploaded; the crash came before its removal
                    os.unlink(path)
                continue
            try:  # a staged pack the index does not know (it was rebuilt)
                entries = packs.recover(path)
            except RepositoryError:
                os.unlink(path)
                continue
            pack = self.index.add_pack(name)
            self.index.add_objects(pack, entries)
            with self._lock:
                self.names[pack] = name
                self.staged[pack] = path
            self.upload(pack)

    def close(self) -> None:
        """Finishes queued uploads and closes staging files."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
