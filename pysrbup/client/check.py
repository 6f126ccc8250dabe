"""Checking a repository without restoring it (``pysrbup-client check``, like ``restic check``).

One pass walks the directory trees of every backup level by level, each
distinct tree once (as garbage collection does), decrypting and parsing
every tree, and asks the server in batches whether it stores every data
chunk the trees reference. With ``--read-data`` (or a subset of it) the
chunks of each level are also fetched and verified (AEAD tag and keyed MAC),
then dropped. Damage is collected, never raised.

Memory stays bounded by the number of distinct objects: the ids seen, and
for each tree the tree that first referenced it (plus any further parents).
Nothing records paths while walking. Only when something is damaged does a
second walk go down from the affected backups' roots, through the trees
that lead to damage and nowhere else, to name every damaged backup and path.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from pysrbup.client.progress import Progress
from pysrbup.client.repository import RemoteRepository
from pysrbup.errors import IntegrityError, UsageError
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree
from pysrbup.textsafe import printable

#: Problem lines printed per backup; the rest are counted ("and N more").
LINES_PER_BACKUP = 20
_SUBSET = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)%|(\d+)/(\d+))\s*$")


def parse_subset(spec: str) -> Callable[[bytes], bool]:
    """The chunk selector for ``--read-data-subset``: ``N%`` (random) or ``n/t``.

    ``n/t`` is the n-th of t fixed groups (by the id's first 8 bytes modulo t;
    ids are keyed MACs, so the groups are even): running ``1/t`` to ``t/t``
    reads everything once. UsageError for anything else.
    """
    match = _SUBSET.match(spec)
    if match is None:
        raise UsageError(f"--read-data-subset: {spec!r} is neither N% nor n/t (e.g. 10% or 1/5)")
    if match.group(1) is not None:
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise UsageError(f"--read-data-subset: {spec.strip()} is not between 0% and 100%")
        if percent == 100:
            return lambda oid: True
        chance = random.Random(os.urandom(16)).random
        return lambda oid: chance() * 100 < percent
    n, t = int(match.group(2)), int(match.group(3))
    if not 1 <= n <= t:
        raise UsageError(f"--read-data-subset: {spec.strip()} needs 1 <= n <= t")
    return lambda oid: int.from_bytes(oid[:8], "big") % t == n - 1


@dataclass
class Problem:
    backup_id: str
    path: str  # printable: control characters escaped
    what: str

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"damaged: backup {self.backup_id}: {where}{self.what}"


@dataclass
class CheckResult:
    backups: int = 0
    trees: int = 0
    data_objects: int = 0
    data_read: int = 0
    bytes_read: int = 0
    missing: int = 0
    damaged_objects: int = 0
    duration: float = 0.0
    #: Ids of backups that cannot be restored completely, in listing order.
    damaged_backups: list[str] = field(default_factory=list)
    #: Up to LINES_PER_BACKUP problems per damaged backup.
    problems: list[Problem] = field(default_factory=list)
    #: Problems beyond those, per backup id.
    omitted: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not (self.damaged_backups or self.missing or self.damaged_objects)

    def problem_lines(self) -> list[str]:
        lines = []
        for index, problem in enumerate(self.problems):
            lines.append(problem.line())
            last = index + 1 == len(self.problems)
            if last or self.problems[index + 1].backup_id != problem.backup_id:
                more = self.omitted.get(problem.backup_id, 0)
                if more:
                    lines.append(f"damaged: backup {problem.backup_id}: and {more} more")
        return lines

    def summary(self) -> str:
        return (
            f"{len(self.damaged_backups)} of {self.backups} backup(s) damaged: "
            f"{self.missing} object(s) missing, {self.damaged_objects} damaged"
        )

    def as_dict(self) -> dict:
        return {
            "healthy": self.healthy,
            "backups": self.backups,
            "trees": self.trees,
            "data_objects": self.data_objects,
            "objects_checked": self.trees + self.data_objects,
            "data_objects_read": self.data_read,
            "bytes_read": self.bytes_read,
            "objects_missing": self.missing,
            "objects_damaged": self.damaged_objects,
            "duration": round(self.duration, 3),
            "damaged_backups": self.damaged_backups,
            "problems": [
                {"backup_id": p.backup_id, "path": p.path, "problem": p.what} for p in self.problems
            ],
            "problems_omitted": self.omitted,
        }


@dataclass
class _Tree:
    """What a verified, well-formed tree references: (name, subtree) and (name, chunk ids)."""

    dirs: list[tuple[bytes, bytes]]
    files: list[tuple[bytes, list[bytes]]]


def _read_tree(plain: bytes, oid: bytes) -> _Tree:
    """Parses a tree the way restore would take it; IntegrityError if restore would not."""
    where = f"directory object {oid.hex()[:16]}"
    dirs, files = [], []
    for node in tree.parse(plain, where).nodes:
        if node.type == repo_pb2.NODE_DIR:
            if len(node.subtree) != tree.ID_SIZE:
                raise IntegrityError(f"{where}: directory entry without a valid tree id")
            dirs.append((node.name, node.subtree))
        elif node.type == repo_pb2.NODE_FILE:
            files.append((node.name, [c for c, _, _ in tree.file_chunks(node, where)]))
    return _Tree(dirs, files)


class Check:
    """One check run over every backup of ``repo``.

    ``select`` picks the data chunks to fetch and verify (None: existence only).
    """

    def __init__(
        self,
        repo: RemoteRepository,
        select: Callable[[bytes], bool] | None = None,
        progress: Progress | None = None,
    ):
        self.repo = repo
        self.select = select
        self.progress = progress or Progress("check", enabled=False)
        self.result = CheckResult()
        #: Damaged or missing objects (trees and chunks): id -> why.
        self.bad: dict[bytes, str] = {}
        #: Every tree seen: id -> index into ``_parent``.
        self._trees: dict[bytes, int] = {}
        #: The tree that first referenced each tree (-1 for a backup's root).
        self._parent: list[int] = []
        #: Further referencing trees, for trees with more than one parent.
        self._more_parents: dict[int, list[int]] = {}
        #: Trees that reference a damaged chunk directly.
        self._holds_damage: set[int] = set()
        self._chunks: set[bytes] = set()

    def run(self) -> CheckResult:
        started = time.monotonic()
        infos = self.repo.snapshots()
        self.result.backups = len(infos)
        roots: list[bytes | None] = []
        unreadable: dict[int, str] = {}
        level: list[bytes] = []
        for i, info in enumerate(infos):
            try:
                snap = self.repo.open_snapshot(info)
            except (IntegrityError, DecodeError) as exc:
                unreadable[i] = str(exc).removeprefix(f"backup {info.snapshot_id}: ")
                roots.append(None)
                continue
            root = snap.root_tree
            if len(root) != tree.ID_SIZE:
                unreadable[i] = "the backup record names no valid root tree"
                roots.append(None)
                continue
            roots.append(root)
            if root not in self._trees:
                self._trees[root] = len(self._parent)
                self._parent.append(-1)
                level.append(root)
        while level:
            level = self._check_level(level)
        self.result.trees = len(self._trees)
        self.result.data_objects = len(self._chunks)
        for why in self.bad.values():
            if why.endswith(" is missing in the repository"):
                self.result.missing += 1
            else:
                self.result.damaged_objects += 1
        if self.bad or unreadable:
            self._name_damage(infos, roots, unreadable)
        self.result.duration = time.monotonic() - started
        return self.result

    # ---- the walk ------------------------------------------------------------

    def _check_level(self, level: list[bytes]) -> list[bytes]:
        """Verifies one level of trees and the chunks first seen in it; returns the next."""
        next_level: list[bytes] = []
        fresh: dict[bytes, int] = {}  # chunk first seen in this level -> a tree holding it
        again: set[tuple[bytes, int]] = set()  # more trees holding those, within the level
        left = set(level)
        for oid, plain, problem in self.repo.fetch_objects(level):
            left.discard(oid)
            if plain is None:
                self.bad[oid] = problem
                continue
            self.result.bytes_read += len(plain)
            try:
                parsed = _read_tree(plain, oid)
            except IntegrityError as exc:
                self.bad[oid] = str(exc)
                continue
            here = self._trees[oid]
            for _, subtree in parsed.dirs:
                index = self._trees.get(subtree)
                if index is None:
                    self._trees[subtree] = len(self._parent)
                    self._parent.append(here)
                    next_level.append(subtree)
                elif self._parent[index] != here:  # e.g. two empty directories: one edge
                    more = self._more_parents.setdefault(index, [])
                    if not more or more[-1] != here:
                        more.append(here)
            for _, chunk_ids in parsed.files:
                for chunk in chunk_ids:
                    if chunk not in self._chunks:
                        self._chunks.add(chunk)
                        fresh[chunk] = here
                    elif chunk in fresh:
                        if fresh[chunk] != here:
                            again.add((chunk, here))
                    elif chunk in self.bad:
                        self._holds_damage.add(here)
        for oid in left:
            self.bad[oid] = _not_returned(oid)
        self._check_chunks(list(fresh))
        for chunk, holder in (*fresh.items(), *again):
            if chunk in self.bad:
                self._holds_damage.add(holder)
        return next_level

    def _check_chunks(self, chunks: list[bytes]) -> None:
        """Existence of ``chunks``; with a selector, fetches and verifies the chosen ones."""
        for oid in self.repo.missing_objects(chunks):
            self.bad[oid] = f"object {oid.hex()[:16]} is missing in the repository"
        if self.select is None:
            return
        chosen = [oid for oid in chunks if oid not in self.bad and self.select(oid)]
        left = set(chosen)
        for oid, plain, problem in self.repo.fetch_objects(chosen):
            left.discard(oid)
            if plain is None:
                self.bad[oid] = problem
                continue
            self.result.data_read += 1
            self.result.bytes_read += len(plain)
            self.progress.add_bytes(len(plain))
        for oid in left:
            self.bad[oid] = _not_returned(oid)

    # ---- naming the damage -----------------------------------------------------

    def _leads_to_damage(self) -> set[int]:
        """Every tree from which damage can be reached (holding it or above it)."""
        found = {self._trees[oid] for oid in self.bad if oid in self._trees}
        found |= self._holds_damage
        todo = list(found)
        while todo:
            index = todo.pop()
            for parent in (self._parent[index], *self._more_parents.get(index, ())):
                if parent >= 0 and parent not in found:
                    found.add(parent)
                    todo.append(parent)
        return found

    def _name_damage(
        self, infos: list, roots: list[bytes | None], unreadable: dict[int, str]
    ) -> None:
        """Walks down from each damaged backup's root to every damaged path in it."""
        tainted = self._leads_to_damage()
        found: dict[int, list[Problem]] = {}
        counts: dict[int, int] = {}

        def report(backup: int, path: str, what: str) -> None:
            counts[backup] = counts.get(backup, 0) + 1
            if counts[backup] <= LINES_PER_BACKUP:
                found.setdefault(backup, []).append(Problem(infos[backup].snapshot_id, path, what))

        # (backup, path, tree id): the trees that lead to damage, level by level
        level: list[tuple[int, str, bytes]] = []
        for i, root in enumerate(roots):
            if root is None:
                report(i, "", f"the backup record does not open: {unreadable[i]}")
            elif root in self.bad:
                report(i, "/", self.bad[root])
            elif self._trees[root] in tainted:
                level.append((i, "", root))
        while level:
            parsed: dict[bytes, _Tree | str] = {}
            wanted = list(dict.fromkeys(oid for _, _, oid in level))
            for oid, plain, problem in self.repo.fetch_objects(wanted):
                try:
                    parsed[oid] = problem if plain is None else _read_tree(plain, oid)
                except IntegrityError as exc:
                    parsed[oid] = str(exc)
            next_level = []
            for backup, path, oid in level:
                entry = parsed.get(oid, _not_returned(oid))
                if isinstance(entry, str):  # damaged since the first pass
                    report(backup, path or "/", entry)
                    continue
                for name, subtree in entry.dirs:
                    sub_path = f"{path}/{printable(os.fsdecode(name))}"
                    if subtree in self.bad:
                        report(backup, sub_path, self.bad[subtree])
                    elif self._trees.get(subtree, -1) in tainted:
                        next_level.append((backup, sub_path, subtree))
                for name, chunk_ids in entry.files:
                    damaged = [c for c in dict.fromkeys(chunk_ids) if c in self.bad]
                    if damaged:
                        what = self.bad[damaged[0]]
                        if len(damaged) > 1:
                            what += f" (and {len(damaged) - 1} more of its objects)"
                        report(backup, f"{path}/{printable(os.fsdecode(name))}", what)
            level = next_level
        for i in sorted(counts):
            self.result.damaged_backups.append(infos[i].snapshot_id)
            self.result.problems += found[i]
            if counts[i] > LINES_PER_BACKUP:
                self.result.omitted[infos[i].snapshot_id] = counts[i] - LINES_PER_BACKUP


def _not_returned(oid: bytes) -> str:
    return f"object {oid.hex()[:16]} was not returned by the server"
