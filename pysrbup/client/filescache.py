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
import mmap
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import xxhash

from pysrbup._native import records
from pysrbup.client.cache import repo_cache_dir
from pysrbup.fileio import read_into
from pysrbup.repo.wire import ID_SIZE

RACY_SECONDS = 1.0
_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<QqqQII")
_CRC = struct.Struct("<I")
#: A row of the index: path hash and record offset, big-endian so rows sort as numbers.
_ROW = struct.Struct(">QQ")
FLUSH_BYTES = 256 * 1024
COMPACT_BUFFER = 1024 * 1024
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
    """Yields (offset, end, path view) of each intact record of a log, in order; stops at
    damage."""
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
        yield pos, body_end + _CRC.size, body[start : start + plen]
        pos = body_end + _CRC.size


def cacheable(st, now_ns: int) -> bool:
    """Whether a file looked at ``now_ns`` may be cached (see ``RACY_SECONDS``)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) < now_ns - int(RACY_SECONDS * 1e9)


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

    One buffer of 16-byte rows, path hash and record offset, sorted by the
    ``records`` kernel (16 bytes a file; a dict of entries took some 400):
    the log's bytes stay as they were read, and an entry is decoded when it
    is looked up. A hash shared by two paths (about 2^-64 per pair) costs a
    cache miss, nothing else.
    """

    def __init__(self, blob: bytes):
        self.blob = blob
        rows = bytearray()
        self.intact = 0
        for offset, self.intact, path in _records(blob):
            rows += _ROW.pack(_path_hash(path), offset)
            path.release()  # a view of the blob: none may outlive the loop
        # Rows of one hash sort by offset: the last kept is the path's latest record.
        self.rows = records.sorted_rows(rows, _ROW.size, 8)
        self.seen = bytearray(len(self))  # 1: looked up and kept by this run

    def __len__(self) -> int:
        return len(self.rows) // _ROW.size

    def _place(self, key: int) -> int:
        """The row of ``key``, or -1."""
        return records.find(self.rows, _ROW.size, key.to_bytes(8, "big"))

    def find(self, path: bytes) -> tuple[int, Entry] | None:
        """(place, entry) of ``path``, or None."""
        at = self._place(_path_hash(path))
        if at < 0:
            return None
        offset = _ROW.unpack_from(self.rows, at * _ROW.size)[1]
        found, entry = read_record(self.blob, offset)
        return (at, entry) if found == path else None

    def keep(self, path: bytes) -> None:
        at = self._place(_path_hash(path))
        if at >= 0:
            self.seen[at] = 1

    def kept(self, log, root_prefix: bytes) -> Iterator[bytes]:
        """The records seen in this run or outside ``root_prefix``, read in order from
        ``log`` (the log file, buffered): memory stays flat however long it is."""
        order = bytearray()  # (offset, row) by offset: the log is read front to back
        for row, (_, offset) in enumerate(_ROW.iter_unpack(self.rows)):
            order += _ROW.pack(offset, row)
        records.sort_unique(order, _ROW.size, _ROW.size)
        seen = self.seen
        for offset, row in _ROW.iter_unpack(order):
            log.seek(offset)  # within the buffer: no system call
            head = log.read(_LEN.size + _HEAD.size)
            if len(head) < _LEN.size + _HEAD.size:
                raise OSError("the files cache log shrank while it was compacted")
            (length,) = _LEN.unpack_from(head)
            plen = _HEAD.unpack_from(head, _LEN.size)[5]
            rest = log.read(length + _CRC.size - _HEAD.size)
            if len(rest) != length + _CRC.size - _HEAD.size:
                raise OSError("the files cache log shrank while it was compacted")
            if seen[row] or plen < len(root_prefix) or rest[: len(root_prefix)] != root_prefix:
                yield head + rest


def _read_log(path: str):
    """The log's bytes, in a map of their own (not the heap), so that ``leave_to_workers``
    gives the memory back; b"" when there is none."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return b""
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if not size:
            return b""
        blob = mmap.mmap(-1, size)
        view = memoryview(blob)
        got = read_into(handle.readinto, view)
        view.release()
        if got < size:  # shrank under us: what was read is the log
            shorter = blob[:got]
            blob.close()
            return shorter
        return blob


class FilesCache:
    """The files cache of one repository; ``add`` is thread-safe.

    What was loaded stays in the log's bytes behind a ``_LogIndex``; entries
    added by this run go to the log only (each path is looked up once a run,
    before it is added), so the memory grows with the files of the last
    backup, not with this one's.
    """

    def __init__(self, repo_id: bytes, folder: str | None = None):
        self.folder = folder or repo_cache_dir(repo_id)
        self.path = os.path.join(self.folder, "files")
        self._index = _LogIndex(b"")
        self.added = 0
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handle = None
        self._lock_file = None
        self.writable = False

    def open(self, read_only: bool = False) -> FilesCache:
        """Loads the log and locks it for writing (read-only if asked, or if another backup
        holds it: then this run adds nothing)."""
        self._lock_file = open(self.path + ".lock", "w")  # noqa: SIM115 - closed in close()
        try:
            if read_only:
                raise BlockingIOError
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.writable = True
        except BlockingIOError:
            self.writable = False
        blob = _read_log(self.path)
        self._index = _LogIndex(blob)
        if self.writable:
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            if self._index.intact != len(blob):  # a torn tail from a crash: cut it off
                self._handle.truncate(self._index.intact)
        return self

    def __len__(self) -> int:
        return len(self._index) + self.added

    def leave_to_workers(self) -> None:
        """After the worker processes forked: drops this process's copy of the loaded
        log (theirs stay, for lookups); ``keep`` and ``compact`` do not need it."""
        blob, self._index.blob = self._index.blob, None
        if isinstance(blob, mmap.mmap):
            blob.close()

    def lookup(self, path: bytes, st: os.stat_result) -> Entry | None:
        """The entry of ``path`` if its stat still matches."""
        found = self.find_unchanged(path, st)
        return found[1] if found is not None else None

    def find_unchanged(self, path: bytes, st: os.stat_result) -> tuple[int, Entry] | None:
        """(place, entry) of ``path`` if its stat still matches; ``keep_place(place)``
        then keeps it (a worker looks up, the main process keeps)."""
        found = self._index.find(path)
        return found if found is not None and found[1].matches(st) else None

    def keep(self, path: bytes) -> None:
        """Marks a cached entry as still in use (kept when the log is rewritten)."""
        self._index.keep(path)

    def keep_place(self, place: int) -> None:
        """``keep`` by the place ``find_unchanged`` gave."""
        self._index.seen[place] = 1

    def add(self, path: bytes, st: os.stat_result, ids: bytes, sizes: bytes, now_ns: int) -> None:
        """Records a file whose chunks are all durable on the server (unless ``cacheable``
        says its times are too recent to trust)."""
        if cacheable(st, now_ns):
            self.append_record(record_of(path, st, ids, sizes))

    def append_record(self, record: bytes) -> None:
        """Appends a record made by ``record_of`` of a file found ``cacheable``."""
        with self._lock:
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
        """After a complete backup of ``root``: keeps entries seen now or outside ``root``.

        The log is rewritten from the loaded records kept and this run's
        records (its tail, appended after what was loaded), in pieces; the
        cache takes no more entries afterwards.
        """
        if self._handle is None:
            return
        prefix = root.rstrip(b"/") + b"/"
        with self._lock:
            self._flush_locked()
            index = self._index
            self.leave_to_workers()  # the blob is not needed: the records are read anew
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "wb") as out, open(self.path, "rb", COMPACT_BUFFER) as log:
                    pieces: list[bytes] = []
                    size = 0
                    for record in index.kept(log, prefix):
                        pieces.append(record)
                        size += len(record)
                        if size >= FLUSH_BYTES:
                            out.write(b"".join(pieces))
                            pieces, size = [], 0
                    out.write(b"".join(pieces))
                    log.seek(index.intact)
                    shutil.copyfileobj(log, out, FLUSH_BYTES)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return
            finally:
                self._handle.close()
                self._handle = None
                self._index = _LogIndex(b"")

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
