"""Pure-Python twin of the ``_framing`` extension: batches of chunk records on the wire.

A frame carries many records (chunk id, flags, payload) in one buffer so the
client and server exchange one gRPC message per batch instead of one per chunk,
and the receiver slices records out without copying. Layout (all integers
little-endian)::

    offset  size  field
    ------  ----  -----------------------------------------------
         0     4  magic  b"PSF1"
         4     4  count  u32, number of records that follow
         8        record[0] ... record[count - 1], back to back:

    record:
    +------------------+---------+------------+--------------------+
    | id (32 bytes)    | flags   | length     | payload            |
    |                  | u8      | u32 LE     | (length bytes)     |
    +------------------+---------+------------+--------------------+
      0               32        33           37                 37+length

The frame ends exactly after the last record: trailing bytes are an error.
A payload is at most :data:`MAX_PAYLOAD` bytes. The parser treats its input
as hostile: every length is checked against the bytes actually present
before it is used, and nothing is allocated in proportion to a claimed size.

This module is the readable reference the compiled kernel is tested against;
it has exactly the same public API, results and error messages.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from pysrbup._native.framing_errors import FrameError

MAGIC = b"PSF1"
HEADER_SIZE = 8
RECORD_OVERHEAD = 37
ID_SIZE = 32
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_COUNT = 0xFFFFFFFF

_HEADER = struct.Struct("<4sI")
_FLAGS_LENGTH = struct.Struct("<BI")

Record = tuple[Any, int, Any]

__all__ = [
    "HEADER_SIZE",
    "ID_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "RECORD_OVERHEAD",
    "FrameError",
    "pack_records",
    "unpack_records",
]


def _byte_view(obj: Any, what: str) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.contiguous:
        raise BufferError(f"{what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_records(records: Sequence[Record]) -> list[tuple[memoryview, int, memoryview]]:
    checked = []
    for index, record in enumerate(records):
        if len(record) != 3:
            raise ValueError(f"record {index}: expected (id, flags, payload)")
        rid, flags, payload = record
        id_view = _byte_view(rid, f"record {index} id")
        if id_view.nbytes != ID_SIZE:
            raise ValueError(f"record {index}: id must be {ID_SIZE} bytes, got {id_view.nbytes}")
        if not isinstance(flags, int):
            raise TypeError(f"record {index}: flags must be an int")
        if not 0 <= flags <= 0xFF:
            raise ValueError(f"record {index}: flags {flags} outside [0, 255]")
        pay_view = _byte_view(payload, f"record {index} payload")
        if pay_view.nbytes > MAX_PAYLOAD:
            raise ValueError(
                f"record {index}: payload of {pay_view.nbytes} bytes exceeds {MAX_PAYLOAD}"
            )
        checked.append((id_view, flags, pay_view))
    if len(checked) > MAX_COUNT:
        raise ValueError(f"too many records for one frame: {len(checked)}")
    return checked


def pack_records(records: Sequence[Record]) -> bytes:
    """Packs ``records`` into a new frame (one join: one copy per payload).

    Args:
        records: ``(id, flags, payload)`` tuples; ``id`` is any 32-byte buffer,
            ``flags`` an int in [0, 255], ``payload`` any buffer of at most
            :data:`MAX_PAYLOAD` bytes.

    Returns:
        The frame as ``bytes`` (what gRPC sends without another copy).

    Raises:
        ValueError: A record is invalid, or there are too many.
        TypeError: An id or payload is not a buffer, or flags is not an int.
    """
    checked = _check_records(records)
    parts: list[Any] = [_HEADER.pack(MAGIC, len(checked))]
    for id_view, flags, pay_view in checked:
        parts += (id_view, _FLAGS_LENGTH.pack(flags, pay_view.nbytes), pay_view)
    return b"".join(parts)


def unpack_records(
    buf: Any, max_payload: int = MAX_PAYLOAD, max_records: int = 1_000_000
) -> list[tuple[memoryview, int, memoryview]]:
    """Parses a frame, returning ``(id, flags, payload)`` for every record.

    ``id`` and ``payload`` are memoryviews into ``buf`` (no copy): keep ``buf``
    unchanged while they are in use (a bytearray cannot be resized meanwhile).

    Args:
        buf: The frame, any contiguous buffer; untrusted.
        max_payload: Largest payload accepted, in bytes.
        max_records: Largest record count accepted.

    Raises:
        FrameError: The frame is malformed or exceeds the limits.
    """
    if max_payload < 0 or max_records < 0:
        raise ValueError("max_payload and max_records must be >= 0")
    view = _byte_view(buf, "buf")
    n = view.nbytes
    if n < HEADER_SIZE:
        raise FrameError(f"frame truncated: {n} bytes, header needs {HEADER_SIZE}")
    magic, count = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if count > max_records:
        raise FrameError(f"frame claims {count} records, limit is {max_records}")
    if count * RECORD_OVERHEAD > n - HEADER_SIZE:
        raise FrameError(f"frame claims {count} records but has only {n} bytes")
    records = []
    pos = HEADER_SIZE
    for index in range(count):
        if n - pos < RECORD_OVERHEAD:
            raise FrameError(f"record {index}: truncated header at offset {pos}")
        flags = view[pos + ID_SIZE]
        (length,) = struct.unpack_from("<I", view, pos + ID_SIZE + 1)
        if length > max_payload:
            raise FrameError(f"record {index}: payload length {length} exceeds {max_payload}")
        start = pos + RECORD_OVERHEAD
        if length > n - start:
            raise FrameError(
                f"record {index}: payload of {length} bytes truncated at offset {start}"
            )
        records.append((view[pos : pos + ID_SIZE], flags, view[start : start + length]))
        pos = start + length
    if pos != n:
        raise FrameError(f"{n - pos} trailing bytes after {count} records")
    return records
