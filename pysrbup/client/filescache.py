"""The files cache: lets an unchanged file be skipped without reading it.

One per repository, in its cache folder (see cache.py): for each file
backed up, its absolute path, size, mtime, ctime and inode, and the ids and
sizes of its chunks. A file whose stat still matches, and whose chunk ids
are all still in the synced id set (a delete may have collected them), is
taken from here instead of being read.

It is an append-only log, written while a backup runs, so an interrupted
backup leaves behind everything it finished: the rerun skips those files.
An entry is appended only once every chunk it names is durable on the server
(the caller's job: see ``Backup``), so a rerun never references a chunk that
was never stored. Record layout (little-endian)::

    u32 length of what follows up to the checksum
    u64 size | i64 mtime_ns | i64 ctime_ns | u64 inode | u32 chunks | u32 path length
    path bytes | chunk ids (32 each) | chunk sizes (u32 each)
    u32 crc32 of everything after the length

Loading stops at the first torn or corrupt record and cuts the file there.
A complete backup rewrites the log with only the entries it saw (plus those
of other source directories), so the file does not grow without end.

Files modified less than ``RACY_SECONDS`` before they were looked at are not
cached: file systems keep coarse timestamps, so a write right after the read
could leave size and times unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from dataclasses import dataclass

from pysrbup.client.cache import repo_cache_dir
from pysrbup.repo.wire import ID_SIZE

RACY_SECONDS = 1.0
_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<QqqQII")
_CRC = struct.Struct("<I")
FLUSH_BYTES = 256 * 1024
MAX_RECORD = 1 << 30


@dataclass(frozen=True)
class Entry:
    """What the cache knows about one file."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    chunk_ids: bytes
    chunk_sizes: bytes

    def matches(self, st: os.stat_result) -> bool:
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.inode == st.st_ino
        )


def encode(path: bytes, entry: Entry) -> bytes:
    count = len(entry.chunk_ids) // ID_SIZE
    body = b"".join(
        (
            _HEAD.pack(entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode, count, len(path)),
            path,
            entry.chunk_ids,
            entry.chunk_sizes,
        )
    )
    return _LEN.pack(len(body)) + body + _CRC.pack(zlib.crc32(body))


def decode(blob: bytes) -> tuple[dict[bytes, Entry], int]:
    """Parses a log; returns the entries (later records win) and the intact length."""
    entries: dict[bytes, Entry] = {}
    view = memoryview(blob)
    pos = 0
    end = len(blob)
    while pos + _LEN.size <= end:
        (length,) = _LEN.unpack_from(view, pos)
        body_end = pos + _LEN.size + length
        if length < _HEAD.size or length > MAX_RECORD or body_end + _CRC.size > end:
            break
        body = view[pos + _LEN.size : body_end]
        if zlib.crc32(body) != _CRC.unpack_from(view, body_end)[0]:
            break
        size, mtime, ctime, inode, count, plen = _HEAD.unpack_from(body)
        if _HEAD.size + plen + count * (ID_SIZE + 4) != length:
            break
        at = _HEAD.size
        path = bytes(body[at : at + plen])
        at += plen
        ids = bytes(body[at : at + count * ID_SIZE])
        at += count * ID_SIZE
        sizes = bytes(body[at : at + 4 * count])
        entries[path] = Entry(size, mtime, ctime, inode, ids, sizes)
        pos = body_end + _CRC.size
    return entries, pos


class FilesCache:
    """The files cache of one repository; ``add`` is thread-safe."""

    def __init__(self, repo_id: bytes, folder: str | None = None):
        self.folder = folder or repo_cache_dir(repo_id)
        self.path = os.path.join(self.folder, "files")
        self.entries: dict[bytes, Entry] = {}
        self.seen: set[bytes] = set()
        self.added = 0
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handle = None
        self._lock_file = None
        self.writable = False

    def open(self, read_only: bool = False) -> FilesCache:
        """Loads the log and locks it for writing (read-only if asked, or if another backup
        holds it: then entries are only kept in memory)."""
        self._lock_file = open(self.path + ".lock", "w")  # noqa: SIM115 - closed in close()
        try:
            if read_only:
                raise BlockingIOError
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.writable = True
        except BlockingIOError:
            self.writable = False
        try:
            with open(self.path, "rb") as handle:
                blob = handle.read()
        except FileNotFoundError:
            blob = b""
        self.entries, intact = decode(blob)
        if self.writable:
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            if intact != len(blob):  # a torn tail from a crash: cut it off
                self._handle.truncate(intact)
        return self

    def lookup(self, path: bytes, st: os.stat_result) -> Entry | None:
        """The entry of ``path`` if its stat still matches."""
        entry = self.entries.get(path)
        if entry is not None and entry.matches(st):
            return entry
        return None

    def keep(self, path: bytes) -> None:
        """Marks a cached entry as still in use (kept when the log is rewritten)."""
        self.seen.add(path)

    def add(self, path: bytes, st: os.stat_result, ids: bytes, sizes: bytes, now_ns: int) -> None:
        """Records a file whose chunks are all durable on the server."""
        if max(st.st_mtime_ns, st.st_ctime_ns) >= now_ns - int(RACY_SECONDS * 1e9):
            return
        entry = Entry(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, ids, sizes)
        record = encode(path, entry)
        with self._lock:
            self.entries[path] = entry
            self.seen.add(path)
            self.added += 1
            if self._handle is None:
                return
            self._buffer.append(record)
            self._buffered += len(record)
            if self._buffered >= FLUSH_BYTES:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._handle is not None and self._buffer:
            with contextlib.suppress(OSError):
                self._handle.write(b"".join(self._buffer))
                self._handle.flush()
        self._buffer, self._buffered = [], 0

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def compact(self, root: bytes) -> None:
        """After a complete backup of ``root``: keeps entries seen now or outside ``root``."""
        if self._handle is None:
            return
        prefix = root.rstrip(b"/") + b"/"
        with self._lock:
            self._flush_locked()
            keep = {
                p: e for p, e in self.entries.items() if p in self.seen or not p.startswith(prefix)
            }
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(b"".join(encode(p, e) for p, e in keep.items()))
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return
            self._handle.close()
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            self.entries = keep

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
