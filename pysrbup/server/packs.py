"""Pack files: append-only containers of encrypted objects.

A pack is written by one session, appended to, made durable with fsync, and
finally sealed with a footer that lists what it holds, so the index can be
rebuilt from the packs alone. Layout (integers little-endian)::

    header   b"PSRBPACK" | version u32 | pack id (16)                28 bytes
    record   object id (32) | length u32 | xxh3_64(payload) u64      44 bytes
             payload (length bytes: the object's envelope)
    ...      more records
    footer   per record: object id (32) | payload offset u64 | length u32
    trailer  footer offset u64 | record count u32 | xxh3_64(footer) u64 |
             b"PSRBFOOT"                                             28 bytes

An unsealed pack (a crash while writing) is recovered by scanning records
from the header and stopping at the first one whose checksum fails.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from pysrbup.errors import RepositoryError, StorageFullError

MAGIC = b"PSRBPACK"
TRAILER_MAGIC = b"PSRBFOOT"
VERSION = 1
PACK_ID_SIZE = 16
HEADER = struct.Struct("<8sI16s")
RECORD = struct.Struct("<32sIQ")
ENTRY = struct.Struct("<32sQI")
TRAILER = struct.Struct("<QIQ8s")
#: A pack is sealed once it grows past this many bytes.
TARGET_PACK_SIZE = 32 * 1024 * 1024
#: No single object may be larger (trees of huge directories are the largest).
MAX_OBJECT_SIZE = 64 * 1024 * 1024
#: ``PackWriter.append_many`` writes this many records per ``writev`` (two buffers each,
#: within Linux's IOV_MAX of 1024).
WRITEV_RECORDS = 256


@dataclass(frozen=True)
class Entry:
    """Where one object's payload sits inside a pack."""

    oid: bytes
    offset: int
    length: int


def checksum(data) -> int:
    """The per-record checksum (xxh3, 64 bits)."""
    return xxhash.xxh3_64_intdigest(data)


def fsync_dir(path: str) -> None:
    """Makes a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, doing: str) -> Exception:
    """The error to raise for ``exc`` met while ``doing`` ("writing a pack"): a full
    disk (or quota) is StorageFullError, anything else RepositoryError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"server disk is full while {doing}")
    return RepositoryError(f"I/O error while {doing}: {exc.strerror or exc}")


class PackWriter:
    """Appends records to one new pack file; not thread-safe (one per session)."""

    def __init__(self, path: str, pack_id: bytes):
        self.path = path
        self.pack_id = pack_id
        self.entries: list[Entry] = []
        self._durable_size = 0
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(self._fd, HEADER.pack(MAGIC, VERSION, pack_id))
            os.fsync(self._fd)
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise storage_error(exc, "creating a pack") from None
        self.size = HEADER.size
        self._durable_size = self.size
        self._durable_entries = 0

    def append(self, oid: bytes, payload) -> Entry:
        """Writes one record; durable only after ``sync``."""
        length = len(payload)
        header = RECORD.pack(oid, length, checksum(payload))
        try:
            written = os.writev(self._fd, [header, payload])
        except OSError as exc:
            self.rollback()
            raise storage_error(exc, "writing a pack") from None
        if written != len(header) + length:
            self.rollback()
            raise StorageFullError("server disk is full while writing a pack (short write)")
        entry = Entry(oid, self.size + RECORD.size, length)
        self.size += RECORD.size + length
        self.entries.append(entry)
        return entry

    def append_many(self, records: list[tuple[bytes, Any]]) -> None:
        """Writes records (id, payload) with one ``writev`` per ``WRITEV_RECORDS``.

        The same bytes as ``append`` for each in turn, without a system call
        per record; durable only after ``sync``.
        """
        size = self.size
        for start in range(0, len(records), WRITEV_RECORDS):
            parts: list[Any] = []
            expected = 0
            for oid, payload in records[start : start + WRITEV_RECORDS]:
                length = len(payload)
                parts += (RECORD.pack(oid, length, checksum(payload)), payload)
                self.entries.append(Entry(oid, size + RECORD.size, length))
                size += RECORD.size + length
                expected += RECORD.size + length
            try:
                written = os.writev(self._fd, parts)
            except OSError as exc:
                self.rollback()
                raise storage_error(exc, "writing a pack") from None
            if written != expected:
                self.rollback()
                raise StorageFullError("server disk is full while writing a pack (short write)")
            self.size = size

    def sync(self) -> list[Entry]:
        """Makes every appended record durable; returns the records made durable now."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.rollback()
            raise storage_error(exc, "syncing a pack") from None
        fresh = self.entries[self._durable_entries :]
        self._durable_size = self.size
        self._durable_entries = len(self.entries)
        return fresh

    def rollback(self) -> None:
        """Drops everything appended since the last ``sync`` (after a failed write)."""
        try:
            os.ftruncate(self._fd, self._durable_size)
            os.lseek(self._fd, self._durable_size, os.SEEK_SET)
        except OSError:
            pass
        self.size = self._durable_size
        del self.entries[self._durable_entries :]

    def seal(self) -> None:
        """Writes the footer and closes the pack; it is never written again."""
        try:
            self.sync()
            write_footer(self._fd, self.size, self.entries)
            os.fsync(self._fd)
        except OSError as exc:
            raise storage_error(exc, "sealing a pack") from None
        finally:
            os.close(self._fd)
            self._fd = -1

    def abandon(self) -> None:
        """Closes without sealing (recovery seals it on the next start)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_footer(fd: int, offset: int, entries: list[Entry]) -> None:
    """Writes footer and trailer at ``offset`` of the open pack ``fd``."""
    footer = b"".join(ENTRY.pack(e.oid, e.offset, e.length) for e in entries)
    trailer = TRAILER.pack(offset, len(entries), checksum(footer), TRAILER_MAGIC)
    os.pwrite(fd, footer + trailer, offset)
    os.ftruncate(fd, offset + len(footer) + len(trailer))


def read_footer(path: str) -> list[Entry] | None:
    """The entries of a sealed pack, or None when it has no valid footer."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < HEADER.size + TRAILER.size:
            return None
        handle.seek(size - TRAILER.size)
        offset, count, digest, magic = TRAILER.unpack(handle.read(TRAILER.size))
        if magic != TRAILER_MAGIC or offset + count * ENTRY.size + TRAILER.size != size:
            return None
        handle.seek(offset)
        footer = handle.read(count * ENTRY.size)
        if checksum(footer) != digest:
            return None
        return [Entry(*ENTRY.unpack_from(footer, i * ENTRY.size)) for i in range(count)]


def read_header(path: str) -> bytes:
    """The pack id in the header of ``path``; RepositoryError if it is not a pack."""
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) != HEADER.size:
        raise RepositoryError(f"pack {path} is truncated")
    magic, version, pack_id = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise RepositoryError(f"{path} is not a pysrbup pack")
    return pack_id


def scan_records(path: str) -> Iterator[Entry]:
    """Yields the intact records of a pack from the start, stopping at the first bad one."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        pos = HEADER.size
        handle.seek(pos)
        while pos + RECORD.size <= size:
            raw = handle.read(RECORD.size)
            oid, length, digest = RECORD.unpack(raw)
            if length > MAX_OBJECT_SIZE or pos + RECORD.size + length > size:
                return
            payload = handle.read(length)
            if checksum(payload) != digest:
                return
            yield Entry(oid, pos + RECORD.size, length)
            pos += RECORD.size + length


def recover(path: str) -> list[Entry]:
    """Seals an unsealed pack after a crash: keeps its intact records, drops the torn tail."""
    sealed = read_footer(path)
    if sealed is not None:
        return sealed
    read_header(path)
    entries = list(scan_records(path))
    end = entries[-1].offset + entries[-1].length if entries else HEADER.size
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, end)
        write_footer(fd, end, entries)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entries


def read_record(fd: int, entry_offset: int, length: int, oid: bytes) -> memoryview | None:
    """Reads a payload and checks its record header; None when it is damaged."""
    start = entry_offset - RECORD.size
    return check_record(os.pread(fd, RECORD.size + length, start), length, oid)


def check_record(raw: bytes | memoryview, length: int, oid: bytes) -> memoryview | None:
    """The payload of ``raw`` (a record header and payload), or None when it is damaged."""
    if len(raw) != RECORD.size + length:
        return None
    stored_oid, stored_len, digest = RECORD.unpack_from(raw)
    payload = memoryview(raw)[RECORD.size :]
    if stored_oid != oid or stored_len != length or checksum(payload) != digest:
        return None
    return payload


def parse_trailer(trailer: bytes, size: int) -> tuple[int, int, int] | None:
    """(footer offset, record count, footer checksum) from a pack's last 28 bytes, if valid."""
    if size < HEADER.size + TRAILER.size or len(trailer) != TRAILER.size:
        return None
    offset, count, digest, magic = TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC or offset + count * ENTRY.size + TRAILER.size != size:
        return None
    return offset, count, digest


def parse_footer(footer: bytes, count: int, digest: int) -> list[Entry] | None:
    """The entries of a footer read from a pack, or None if its checksum fails."""
    if len(footer) != count * ENTRY.size or checksum(footer) != digest:
        return None
    return [Entry(*ENTRY.unpack_from(footer, i * ENTRY.size)) for i in range(count)]


def scan_bytes(data: bytes | memoryview) -> list[Entry]:
    """The intact records of a pack held in memory, from the start up to the first bad one."""
    view = memoryview(data)
    size = len(view)
    if size < HEADER.size or HEADER.unpack_from(view)[0] != MAGIC:
        return []
    found = []
    pos = HEADER.size
    while pos + RECORD.size <= size:
        _oid, length, digest = RECORD.unpack_from(view, pos)
        if length > MAX_OBJECT_SIZE or pos + RECORD.size + length > size:
            break
        if checksum(view[pos + RECORD.size : pos + RECORD.size + length]) != digest:
            break
        found.append(Entry(_oid, pos + RECORD.size, length))
        pos += RECORD.size + length
    return found


def sealed_size(entries: list[Entry]) -> int:
    """The size of a sealed pack holding exactly ``entries`` (its live bytes, for compaction)."""
    return (
        HEADER.size
        + sum(RECORD.size + e.length for e in entries)
        + (len(entries) * ENTRY.size + TRAILER.size)
    )


def damaged_in(pack: memoryview) -> str:
    """Checks a whole sealed pack held in memory: "" if every record verifies, else why not."""
    size = len(pack)
    if size < HEADER.size + TRAILER.size:
        return "too short to be a pack"
    offset, count, digest, magic = TRAILER.unpack_from(pack, size - TRAILER.size)
    if magic != TRAILER_MAGIC or offset + count * ENTRY.size + TRAILER.size != size:
        return "no valid footer"
    footer = pack[offset : offset + count * ENTRY.size]
    if checksum(footer) != digest:
        return "damaged footer"
    bad = 0
    for i in range(count):
        oid, start, length = ENTRY.unpack_from(footer, i * ENTRY.size)
        head = start - RECORD.size
        if head < HEADER.size or start + length > offset:
            bad += 1
            continue
        stored_oid, stored_len, stored_sum = RECORD.unpack_from(pack, head)
        if (stored_oid, stored_len) != (oid, length) or checksum(
            pack[start : start + length]
        ) != stored_sum:
            bad += 1
    return f"{bad} damaged record(s)" if bad else ""
