"""Creating files only below one directory: every call relative to a directory fd.

A restore must never leave its target, even when the target already holds
symlinks (``--force``) or a directory is swapped for a symlink while it runs.
So no path string is ever handed to the kernel: every directory is opened
with ``O_NOFOLLOW`` relative to its parent's fd, starting from the target's
fd, and every create, open, chmod, chown, utime, symlink and unlink names a
single entry relative to such an fd (or works on the entry's own fd). Path
strings serve only for messages.

``DirTable`` numbers the directories of a restore and hands out their fds
from a bounded cache, so writing many small files neither reopens the
directory per file nor keeps every directory of a large tree open.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

#: A directory, never through a symlink.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A file this restore created, for setting its metadata.
META_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

ROOT = 0
#: Directory fds kept open while no thread uses them (besides the root's).
CACHED_DIRS = 128


class DirTable:
    """The directories of one restore, by number, and a bounded cache of their fds.

    Number 0 is the target itself (``root_fd``, open until ``close``). Every
    other directory is known by its parent's number and its name, and opened
    on demand from the nearest open ancestor down, one ``O_NOFOLLOW``
    component at a time. ``acquire`` pins an fd open until ``release``; idle
    fds beyond ``limit`` are closed, least recently used first. Thread-safe.
    """

    def __init__(self, root_fd: int, limit: int = CACHED_DIRS):
        self._parent: list[int] = [-1]
        self._name: list[bytes] = [b""]
        self._fds: dict[int, int] = {ROOT: root_fd}
        self._pins: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._limit = max(1, limit)
        self._lock = threading.Lock()

    def add(self, parent: int, name: bytes) -> int:
        """Registers the directory ``name`` inside directory ``parent``; returns its number."""
        with self._lock:
            self._parent.append(parent)
            self._name.append(name)
            return len(self._name) - 1

    def _pin(self, index: int) -> None:
        self._pins[index] = self._pins.get(index, 0) + 1
        self._idle.pop(index, None)

    def acquire(self, index: int) -> int:
        """The fd of directory ``index``, open until the matching ``release(index)``.

        Raises OSError if a directory on the way is missing or is no longer a
        directory (a symlink put in its place is not followed: ELOOP/ENOTDIR).
        """
        with self._lock:
            fd = self._fds.get(index)
            if fd is not None:
                self._pin(index)
                return fd
            chain = []
            while index not in self._fds:
                chain.append(index)
                index = self._parent[index]
            self._pin(index)
            fd = self._fds[index]
        # ``index`` is the nearest open ancestor (pinned, fd ``fd``): open down from it.
        for child in reversed(chain):
            try:
                child_fd = os.open(self._name[child], DIR_FLAGS, dir_fd=fd)
            except BaseException:
                self.release(index)
                raise
            with self._lock:
                known = self._fds.get(child)
                if known is None:
                    self._fds[child] = child_fd
                else:  # another thread opened it meanwhile: use that one
                    os.close(child_fd)
                    child_fd = known
                self._pin(child)
            self.release(index)
            index, fd = child, child_fd
        return fd

    def release(self, index: int) -> None:
        """Unpins what ``acquire(index)`` returned; it may be closed from now on."""
        with self._lock:
            left = self._pins[index] - 1
            if left:
                self._pins[index] = left
                return
            del self._pins[index]
            if index == ROOT:
                return
            self._idle[index] = None
            while len(self._idle) > self._limit:
                old, _ = self._idle.popitem(last=False)
                os.close(self._fds.pop(old))

    def path(self, index: int, top: str) -> str:
        """The path of directory ``index`` below ``top`` (the target's path), for messages."""
        with self._lock:
            names = []
            while index > ROOT:
                names.append(os.fsdecode(self._name[index]))
                index = self._parent[index]
        return os.path.join(top, *reversed(names))

    def open_count(self) -> int:
        """How many directory fds are open (the root's included)."""
        with self._lock:
            return len(self._fds)

    def close(self) -> None:
        """Closes every fd, the root's too."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._idle.clear()
            self._pins.clear()
