"""Snapshot records: the encrypted description of one backup.

A stored record is ``object id (32) || envelope``: the envelope (see
envelope.py) seals a serialised ``Snapshot`` protobuf, and the object id is
the keyed MAC of that plaintext. The backup id users see is the first 8
bytes of that MAC in hex, so the client can check that the record the
server returns under an id is the one it stored there.
"""

from __future__ import annotations

import datetime

from pysrbup.errors import IntegrityError, UsageError
from pysrbup.proto import repo_pb2
from pysrbup.repo.envelope import Opener, Sealer
from pysrbup.repo.wire import ID_SIZE

SNAPSHOT_FORMAT = 1


def utc_offset(time_ns: int) -> int:
    """This machine's UTC offset in seconds at ``time_ns`` (kept with the backup time)."""
    stamp = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    offset = stamp.utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


def local_time(snapshot: repo_pb2.Snapshot) -> datetime.datetime:
    """The backup time in the zone of the machine that made it (restic's bucket calendar)."""
    zone = datetime.timezone(datetime.timedelta(seconds=snapshot.utc_offset_s))
    return datetime.datetime.fromtimestamp(snapshot.time_ns / 1e9, tz=zone)


def normal_tags(tags) -> list[str]:
    """Tags as stored: unique, sorted, none empty or with a comma (restic's rules)."""
    out = set()
    for tag in tags:
        tag = tag.strip()
        if not tag or "," in tag:
            raise UsageError(f"invalid tag {tag!r}: tags are non-empty and hold no commas")
        out.add(tag)
    return sorted(out)


def snapshot_id_of(oid: bytes) -> str:
    """The user-visible backup id for a record's object id."""
    return oid[:8].hex()


def seal_snapshot(sealer: Sealer, snapshot: repo_pb2.Snapshot) -> tuple[str, bytes]:
    """Returns (backup id, stored record) for ``snapshot``."""
    plain = snapshot.SerializeToString(deterministic=True)
    oid = sealer.object_id(plain)
    return snapshot_id_of(oid), oid + bytes(sealer.seal(oid, plain))


def open_snapshot(opener: Opener, snapshot_id: str, record: bytes) -> repo_pb2.Snapshot:
    """Decrypts and verifies a stored record; IntegrityError if it was tampered with."""
    if len(record) <= ID_SIZE:
        raise IntegrityError(f"backup {snapshot_id}: snapshot record is truncated")
    oid = record[:ID_SIZE]
    if snapshot_id_of(oid) != snapshot_id:
        raise IntegrityError(f"backup {snapshot_id}: the server returned another backup's record")
    try:
        plain = opener.open(oid, record[ID_SIZE:])
    except IntegrityError as exc:
        raise IntegrityError(f"backup {snapshot_id}: snapshot record is damaged ({exc})") from None
    snapshot = repo_pb2.Snapshot()
    snapshot.ParseFromString(plain)
    return snapshot
