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
from typing import NamedTuple

import xxhash

from pysrbup.client.cache import repo_cache_dir
from pysrbup.repo.wire import ID_SIZE

RACY_SECONDS = 1.0
_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<QqqQII")
_CRC = struct.Struct("<I")
FLUSH_BYTES = 256 * 1024
MAX_RECORD = 1 << 30


class Entry(NamedTuple):
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


def _records(blob: bytes):
    """Yields (offset, end, path) of each intact record of a log, in order; stops at damage."""
    view = memoryview(blob)
    pos = 0
    end = len(blob)
    while pos + _LEN.size <= end:
        (length,) = _LEN.unpack_from(view, pos)
        body_end = pos + _LEN.size + length
        if length < _HEAD.size or length > MAX_RECORD or body_end + _CRC.size > end:
            return
        body = view[pos + _LEN.size : body_end]
        if zlib.crc32(body) != _CRC.unpack_from(view, body_end)[0]:
            return
        _, _, _, _, count, plen = _HEAD.unpack_from(body)
        if _HEAD.size + plen + count * (ID_SIZE + 4) != length:
            return
        start = _HEAD.size
        yield pos, body_end + _CRC.size, bytes(body[start : start + plen])
        pos = body_end + _CRC.size


def record_of(path: bytes, st, ids: bytes, sizes: bytes) -> bytes:
    """The log record of ``path`` with this stat and these chunks."""
    return encode(path, Entry(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, ids, sizes))


def read_record(blob, offset: int) -> tuple[bytes, Entry]:
    """The (path, entry) of the intact record at ``offset`` of a log."""
    body = offset + _LEN.size
    size, mtime, ctime, inode, count, plen = _HEAD.unpack_from(blob, body)
    at = body + _HEAD.size
    path = bytes(blob[at : at + plen])
    at += plen
    ids = bytes(blob[at : at + count * ID_SIZE])
    at += count * ID_SIZE
    return path, Entry(size, mtime, ctime, inode, ids, bytes(blob[at : at + 4 * count]))


def _path_hash(path: bytes) -> int:
    return xxhash.xxh3_64_intdigest(path)


class _LogIndex:
    """The records of a loaded log, found by the hash of their path.

    A dict of path hash -> record offset (some 100 bytes a file instead of a
    dict of entries, some 400); the log's bytes stay as they were read, and
    an entry is decoded when it is looked up. A hash shared by two paths
    (about 2^-64 per pair) costs a cache miss, nothing else.
    """

    def __init__(self, blob: bytes):
        self.blob = blob
        self.offsets: dict[int, int] = {}
        self.intact = 0
        for offset, self.intact, path in _records(blob):
            self.offsets[_path_hash(path)] = offset  # later records win
        self.seen: set[int] = set()

    def find(self, path: bytes) -> tuple[int, Entry] | None:
        """(hash, entry) of ``path``, or None."""
        key = _path_hash(path)
        offset = self.offsets.get(key)
        if offset is None:
            return None
        found, entry = read_record(self.blob, offset)
        return (key, entry) if found == path else None

    def kept(self, root_prefix: bytes):
        """(offset, path) of the records seen in this run or outside ``root_prefix``."""
        for key, offset in self.offsets.items():
            plen = _HEAD.unpack_from(self.blob, offset + _LEN.size)[5]
            at = offset + _LEN.size + _HEAD.size
            path = self.blob[at : at + plen]
            if key in self.seen or not path.startswith(root_prefix):
                yield offset, path

    def record_bytes(self, offset: int) -> bytes:
        (length,) = _LEN.unpack_from(self.blob, offset)
        return bytes(self.blob[offset : offset + _LEN.size + length + _CRC.size])


class FilesCache:
    """The files cache of one repository; ``add`` is thread-safe.

    What was loaded stays in the log's bytes behind a ``_LogIndex``; entries
    added by this run are kept in a dict beside it.
    """

    def __init__(self, repo_id: bytes, folder: str | None = None):
        self.folder = folder or repo_cache_dir(repo_id)
        self.path = os.path.join(self.folder, "files")
        self._index = _LogIndex(b"")
        self._added: dict[bytes, bytes] = {}  # this run's entries: path -> record
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
        self._index = _LogIndex(blob)
        if self.writable:
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            if self._index.intact != len(blob):  # a torn tail from a crash: cut it off
                self._handle.truncate(self._index.intact)
        return self

    def __len__(self) -> int:
        return len(self._index.offsets) + len(self._added)

    def lookup(self, path: bytes, st: os.stat_result) -> Entry | None:
        """The entry of ``path`` if its stat still matches."""
        record = self._added.get(path)
        entry = read_record(record, 0)[1] if record is not None else None
        if entry is None:
            found = self._index.find(path)
            entry = found[1] if found is not None else None
        if entry is not None and entry.matches(st):
            return entry
        return None

    def keep(self, path: bytes) -> None:
        """Marks a cached entry as still in use (kept when the log is rewritten)."""
        found = self._index.find(path)
        if found is not None:
            self._index.seen.add(found[0])

    def add(self, path: bytes, st: os.stat_result, ids: bytes, sizes: bytes, now_ns: int) -> None:
        """Records a file whose chunks are all durable on the server."""
        self.add_record(path, st, record_of(path, st, ids, sizes), now_ns)

    def add_record(self, path: bytes, st, record: bytes, now_ns: int) -> None:
        """``add`` with the record already made by ``record_of`` (in a worker process)."""
        if max(st.st_mtime_ns, st.st_ctime_ns) >= now_ns - int(RACY_SECONDS * 1e9):
            return
        with self._lock:
            self._added[path] = record
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
            index = self._index
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "wb") as handle:
                    for offset, path in index.kept(prefix):
                        if path not in self._added:  # superseded by this run's entry
                            handle.write(index.record_bytes(offset))
                    handle.write(b"".join(self._added.values()))
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return
            self._handle.close()
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            with open(self.path, "rb") as handle:
                self._index = _LogIndex(handle.read())
            self._added = {}

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
