"""Opening snapshot records and picking some by host, path and tag (restic's filters).

``--tag a,b --tag c`` selects backups that have both a and b, or c;
``--host`` and ``--path`` may be repeated and select any of the values given.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from pysrbup.client.repository import RemoteRepository
from pysrbup.proto import repo_pb2, service_pb2
from pysrbup.repo import snapshot


@dataclass
class Listed:
    """One backup: what the server listed and the record the key opened."""

    info: service_pb2.SnapshotInfo
    record: repo_pb2.Snapshot

    @property
    def id(self) -> str:
        return self.info.snapshot_id

    @property
    def time(self) -> datetime.datetime:
        return snapshot.local_time(self.record)

    @property
    def host(self) -> str:
        return self.record.hostname

    @property
    def path(self) -> str:
        return os.fsdecode(self.record.source_path)

    @property
    def tags(self) -> list[str]:
        return list(self.record.tags)


def open_all(repo: RemoteRepository) -> list[Listed]:
    """Every backup with its opened record, oldest first (by the authenticated time)."""
    listed = [Listed(info, repo.open_snapshot(info)) for info in repo.snapshots()]
    listed.sort(key=lambda item: (item.record.time_ns, item.id))
    return listed


def tag_sets(values: list[str] | None) -> list[frozenset[str]]:
    """``["a,b", "c"]`` -> [{a, b}, {c}] (each set must be held entirely)."""
    return [frozenset(t for t in v.split(",") if t) for v in values or [] if v]


def select(
    backups: list[Listed],
    tags: list[str] | None = None,
    hosts: list[str] | None = None,
    paths: list[str] | None = None,
) -> list[Listed]:
    """The backups that pass every given filter (restic's semantics, see module docstring)."""
    wanted_tags = tag_sets(tags)
    wanted_paths = {os.path.abspath(p) for p in paths or []}
    out = []
    for item in backups:
        if hosts and item.host not in hosts:
            continue
        if wanted_paths and item.path not in wanted_paths:
            continue
        if wanted_tags and not any(group <= set(item.tags) for group in wanted_tags):
            continue
        out.append(item)
    return out
