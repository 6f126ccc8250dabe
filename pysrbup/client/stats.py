"""``stats``: how big the backups are, how much deduplication saves, what the server holds.

Logical sizes and deduplication come from the trees (only the key can read
them): each file's chunk ids and plaintext sizes. What is stored comes from
the server's own counts. Trees are walked level by level, each distinct tree
once, so memory grows with the number of distinct chunks, not of files.
"""

from __future__ import annotations

from dataclasses import dataclass

from pysrbup.client.gc import walk_trees
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.selection import Listed
from pysrbup.repo import tree


@dataclass
class TreeStats:
    """What the trees of some backups hold."""

    backups: int = 0
    files: int = 0
    dirs: int = 0
    logical_bytes: int = 0  # sum of file sizes, every backup counted
    chunks: int = 0  # distinct data chunks
    unique_bytes: int = 0  # their plaintext bytes: what deduplication leaves
    trees: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 0.0


def tree_stats(repo: RemoteRepository, backups: list[Listed]) -> TreeStats:
    """Walks the trees of ``backups``; IntegrityError if one cannot be read.

    File, directory and byte counts of each backup are the ones its record
    holds (counted when it was made); the walk finds the distinct chunks.
    """
    stats = TreeStats(backups=len(backups))
    for item in backups:
        stats.files += item.record.files
        stats.dirs += item.record.dirs
        stats.logical_bytes += item.record.logical_bytes
    roots = {item.record.root_tree for item in backups}
    chunk_sizes: dict[bytes, int] = {}
    trees = set(roots)
    for where, node in walk_trees(repo, list(roots), "run check to see which backups it damages"):
        if node.subtree:
            trees.add(node.subtree)
        elif node.chunk_ids:
            for chunk_id, _, size in tree.file_chunks(node, where):
                chunk_sizes[chunk_id] = size
    stats.trees = len(trees)
    stats.chunks = len(chunk_sizes)
    stats.unique_bytes = sum(chunk_sizes.values())
    return stats
