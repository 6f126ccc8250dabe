"""Changing a backup's tags: a new snapshot record replaces the old one (restic's ``tag``).

The record is what the backup id names (a MAC of it), so new tags mean a new
record and a new id. The new record is committed first, through a write
session like any backup, and names the id it came from (``original``); the
old record is deleted only after that, so the backup is never missing. No
object is copied: both records point at the same trees.
"""

from __future__ import annotations

from pysrbup.client.idcache import IdCache
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.selection import Listed
from pysrbup.errors import ConcurrentDeleteError
from pysrbup.proto import repo_pb2
from pysrbup.repo import snapshot


def new_tags(
    current: list[str], add: list[str], remove: list[str], replace: list[str] | None
) -> list[str]:
    """The tags after ``--set`` (if given), then ``--add``, then ``--remove``."""
    tags = set(snapshot.normal_tags(replace if replace is not None else current))
    tags |= set(snapshot.normal_tags(add))
    tags -= set(snapshot.normal_tags(remove))
    return sorted(tags)


def retag(repo: RemoteRepository, item: Listed, tags: list[str]) -> str:
    """Replaces ``item``'s record by one with ``tags``; returns the new backup id."""
    if tags == item.tags:
        return item.id
    record = repo_pb2.Snapshot()
    record.CopyFrom(item.record)
    del record.tags[:]
    record.tags.extend(tags)
    record.original = item.record.original or item.id
    session = repo.begin_session()
    # The tree is not walked: it is kept whole only if its root is never condemned
    # from here to the commit (a root condemned means its backup was deleted).
    cache = IdCache(repo.repo_id)
    cache.sync(repo.conn)
    if record.root_tree not in cache.ids:
        repo.end_session(session)
        raise ConcurrentDeleteError(f"backup {item.id} was deleted meanwhile")
    sealer = repo.new_session_sealer(session)
    record.session_key_id = sealer.key_id
    backup_id, sealed = snapshot.seal_snapshot(sealer, record)
    repo.commit_backup(cache, session, backup_id, sealed, {record.root_tree}, revive=False)
    repo.delete_snapshot(item.id)
    return backup_id
