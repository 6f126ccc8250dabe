"""A fault-injecting blob store: full disks and crashes at a chosen operation.

It wraps a real store (a ``LocalStore`` in a temporary directory, or SeaweedFS)
so the crash and disk-full paths run through the same code as production,
instead of tests poking private attributes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from pysrbup.errors import StorageFullError
from pysrbup.server.blobstore import BlobStore


class Crash(BaseException):
    """The process "died" before this store operation (a BaseException: nothing catches it)."""


MUTATIONS = ("put", "put_file", "put_new", "delete")


class FaultyStore(BlobStore):
    """A store that fails on purpose.

    ``crash_after``: the number of mutating operations (put, put_file,
    put_new, delete) that succeed; the next one, and every operation after
    it, raises ``Crash``. ``full``: a predicate on object names whose puts
    fail with StorageFullError, like a full disk.
    """

    def __init__(
        self,
        inner: BlobStore,
        crash_after: int | None = None,
        full: Callable[[str], bool] | None = None,
    ):
        super().__init__()
        self.inner = inner
        self.location = inner.location
        self.local_root = inner.local_root
        self.stats = inner.stats
        self.crash_after = crash_after
        self.full = full
        self.done: list[tuple[str, str]] = []
        self.dead = False
        self._lock = threading.Lock()

    def _enter(self, op: str, name: str) -> None:
        with self._lock:
            if self.dead:
                raise Crash(f"dead before {op} {name}")
            if op in MUTATIONS:
                if self.crash_after is not None and len(self.done) >= self.crash_after:
                    self.dead = True
                    raise Crash(f"crashed before {op} {name}")
                if op != "delete" and self.full is not None and self.full(name):
                    raise StorageFullError("server disk is full (injected)")
                self.done.append((op, name))

    def put(self, name, data) -> None:
        self._enter("put", name)
        self.inner.put(name, data)

    def put_file(self, name, path) -> None:
        self._enter("put_file", name)
        self.inner.put_file(name, path)

    def put_new(self, name, data) -> bool:
        self._enter("put_new", name)
        return self.inner.put_new(name, data)

    def get(self, name, offset=0, length=None) -> bytes:
        self._enter("get", name)
        return self.inner.get(name, offset, length)

    def stat(self, name) -> int | None:
        self._enter("stat", name)
        return self.inner.stat(name)

    def list(self, folder) -> Iterator[tuple[str, int]]:
        self._enter("list", folder)
        return self.inner.list(folder)

    def delete(self, name) -> None:
        self._enter("delete", name)
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()
