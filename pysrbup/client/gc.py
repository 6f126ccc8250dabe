"""Garbage collection, worked out by the client because only it can read trees.

The client lists the remaining snapshots, walks their trees to find every
object still referenced (the live set), and asks the server to condemn every
other id in the repository. The server sweeps a condemned object only once
every session that began before the condemnation has ended, and a backup
revives what it relies on before committing (see RemoteRepository.commit_backup),
so concurrent backups never lose data. A condemnation names (and signs) the
set of snapshots the live set came from, and the server refuses it if its own
set differs: a snapshot committed or deleted meanwhile (the client then starts
over), or a listing that hid a backup from the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pysrbup.client.idcache import IdCache
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.retry import until_settled
from pysrbup.errors import ConflictError, IntegrityError, NotFoundError
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree
from pysrbup.repo.wire import MAX_IDS_PER_REQUEST

CONDEMN_BATCH = MAX_IDS_PER_REQUEST


@dataclass
class GcResult:
    snapshots: int = 0
    live_objects: int = 0
    condemned: int = 0
    bytes_freed: int = 0
    bytes_pending: int = 0


def walk_trees(
    repo: RemoteRepository, roots: list[bytes], why: str
) -> Iterator[tuple[str, repo_pb2.Node]]:
    """Every node below the trees ``roots``, each distinct tree fetched once, level by level.

    Yields (where, node) with ``where`` naming the tree for error messages. A
    tree that cannot be read raises IntegrityError ending in ``why`` (the
    callers' results would be incomplete).
    """
    seen = set(roots)
    level = list(seen)
    while level:
        next_level: list[bytes] = []
        got = 0
        for oid, plain, problem in repo.fetch_objects(level):
            if plain is None:
                raise IntegrityError(f"{problem}; {why}")
            got += 1
            where = f"tree {oid.hex()[:16]}"
            for node in tree.parse(plain, where).nodes:
                if node.subtree and node.subtree not in seen:
                    seen.add(node.subtree)
                    next_level.append(node.subtree)
                yield where, node
        if got != len(level):
            raise IntegrityError("the server did not return every directory object asked for")
        level = next_level


def live_set(repo: RemoteRepository) -> tuple[list[str], set[bytes]]:
    """(the snapshot ids listed, every id those snapshots reference).

    A tree that cannot be read because a concurrent delete removed its
    backup (and collected its objects) meanwhile is a conflict: the caller
    starts over with the new list. Anything else unreadable is damage.
    """
    infos = repo.snapshots()
    listed = [info.snapshot_id for info in infos]
    live: set[bytes] = set()
    why = "not collecting garbage (the live set would be incomplete)"
    try:
        live.update(repo.open_snapshot(info).root_tree for info in infos)
        for where, node in walk_trees(repo, list(live), why):
            if node.subtree:
                live.add(node.subtree)
            elif node.chunk_ids:
                live.update(chunk_id for chunk_id, _, _ in tree.file_chunks(node, where))
    except (IntegrityError, NotFoundError):
        if sorted(info.snapshot_id for info in repo.snapshots()) != sorted(listed):
            raise ConflictError("the backups changed while their trees were read") from None
        raise
    return listed, live


def collect_garbage(repo: RemoteRepository) -> GcResult:
    """Condemns every object no snapshot references; returns what was freed."""

    def attempt() -> GcResult:
        result = GcResult()
        snapshot_ids, live = live_set(repo)
        result.snapshots = len(snapshot_ids)
        result.live_objects = len(live)
        cache = IdCache(repo.repo_id)
        cache.sync(repo.conn)
        garbage = [oid for oid in cache.ids if oid not in live]  # sorted, as the set is
        # One condemn even with no garbage: it sweeps what earlier condemns left pending.
        for start in range(0, max(len(garbage), 1), CONDEMN_BATCH):
            reply = repo.condemn(garbage[start : start + CONDEMN_BATCH], snapshot_ids)
            result.condemned += reply.condemned
            result.bytes_freed += reply.bytes_freed
            result.bytes_pending = reply.bytes_pending
        return result

    return until_settled(
        attempt, "backups kept changing while collecting garbage; run delete again"
    )
