"""Stored snapshot records: the server's file format for ``snapshots/<id>``.

The server keeps, per backup, the client's encrypted record and two facts of
its own (when the record arrived, and how many bytes the writing session
added). Layout (integers little-endian)::

    offset  size  field
    0       8     magic b"PSRBSNAP"
    8       4     version (1)
    12      8     created_ns   i64, server clock (UTC)
    20      8     stored_bytes u64
    28      n     the encrypted record, as the client sent it (n >= 1)

This is a format of the repository, kept apart from the wire messages that
carry the same facts (``SnapshotInfo``), so either can change alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pysrbup.errors import RepositoryError

MAGIC = b"PSRBSNAP"
VERSION = 1
HEADER = struct.Struct("<8sIqQ")


@dataclass(frozen=True)
class StoredSnapshot:
    """One snapshot record as the server keeps it."""

    snapshot_id: str
    created_ns: int
    stored_bytes: int
    record: bytes


def encode(snapshot: StoredSnapshot) -> bytes:
    """The file contents for ``snapshot``."""
    header = HEADER.pack(MAGIC, VERSION, snapshot.created_ns, snapshot.stored_bytes)
    return header + snapshot.record


def decode(snapshot_id: str, data: bytes) -> StoredSnapshot:
    """Parses a stored record file; RepositoryError if it is not one."""
    if len(data) <= HEADER.size:
        raise RepositoryError(f"snapshot file {snapshot_id} is truncated")
    magic, version, created_ns, stored_bytes = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise RepositoryError(f"snapshot file {snapshot_id} is not a pysrbup snapshot record")
    return StoredSnapshot(snapshot_id, created_ns, stored_bytes, data[HEADER.size :])
