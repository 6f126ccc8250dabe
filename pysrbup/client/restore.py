"""Restoring a backup into a local directory.

First the directory trees are fetched level by level, and directories,
symlinks and (empty, pre-sized) files are created. Then every distinct chunk
is fetched once, in the server's pack order, verified (AEAD tag and keyed
MAC), and written with positioned writes at every offset where it belongs.
Metadata (modes, owners, mtimes) is applied last, directories deepest first,
so writing into them does not disturb their times.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pysrbup.client.memtune import RESTORE_MMAP_THRESHOLD, tune_malloc
from pysrbup.client.progress import Progress
from pysrbup.client.repository import FETCH_IDS, RemoteRepository
from pysrbup.errors import IncompleteError, IntegrityError, PysrbupError, RestoreTargetError
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree

FETCH_BYTES = 64 * 1024 * 1024
#: Payload bytes fetched ahead of (or held by) the decrypting workers. Records
#: are views into the server's frames (up to 8 MiB each), so this also bounds
#: how many frames stay alive: 16 records ahead pinned up to 16 frames.
PREFETCH_BYTES = 24 * 1024 * 1024
#: Small records count as this much, so at most a few hundred are in flight.
MIN_RECORD_COST = 64 * 1024


class _ByteBudget:
    """Blocks a producer while more than ``limit`` bytes are out (one item always fits)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, count: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + count > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.used += count
            return True

    def release(self, count: int) -> None:
        with self._cond:
            self.used -= count
            self._cond.notify_all()


@dataclass
class RestoreResult:
    backup_id: str = ""
    target: str = ""
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_written: int = 0
    damaged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "backup_id": self.backup_id,
            "target": self.target,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "bytes_written": self.bytes_written,
            "damaged": self.damaged,
        }


def _check_name(name: bytes, where: str) -> str:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise IntegrityError(f"{where}: invalid file name {name!r} in backup")
    return os.fsdecode(name)


class Restore:
    """One restore run."""

    def __init__(
        self,
        repo: RemoteRepository,
        num_threads: int = 2,
        force: bool = False,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        tune_malloc(RESTORE_MMAP_THRESHOLD)
        self.repo = repo
        self.opener = repo.opener
        self.num_threads = max(1, num_threads)
        self.force = force
        self.progress = progress or Progress("restore", enabled=False)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.result = RestoreResult()
        self._as_root = os.geteuid() == 0
        self._targets: dict[bytes, list[tuple[str, int, int]]] = defaultdict(list)
        self._files: list[tuple[str, repo_pb2.Node]] = []
        self._dirs: list[tuple[str, repo_pb2.Node]] = []
        self._damaged: set[str] = set()
        self._lock = threading.Lock()

    # ---- trees -----------------------------------------------------------

    def _fetch_objects(self, oids: list[bytes]):
        """Yields (id, plaintext or None) for ``oids``; None when missing or damaged."""
        for oid, plain, problem in self.repo.fetch_objects(oids):
            if plain is None:
                self.warn(problem)
            yield oid, plain

    def _damage(self, path: str) -> None:
        with self._lock:
            self._damaged.add(path)

    def _create_tree(self, root_tree: bytes, target: str) -> None:
        level: list[tuple[str, bytes]] = [(target, root_tree)]
        top = True
        while level:
            wanted = {oid: path for path, oid in level}
            found = dict(self._fetch_objects(list(wanted)))
            next_level: list[tuple[str, bytes]] = []
            for path, oid in level:
                plain = found.get(oid)
                if plain is None:
                    self._damage(path if not top else target)
                    continue
                for node in tree.parse(plain, path).nodes:
                    child = os.path.join(path, _check_name(node.name, path))
                    if top:
                        self._check_target(child, node)
                    self._create_node(child, node, next_level)
            level = next_level
            top = False

    def _check_target(self, path: str, node: repo_pb2.Node) -> None:
        if self.force or not os.path.lexists(path):
            return
        if node.type == repo_pb2.NODE_DIR and os.path.isdir(path) and not os.listdir(path):
            return
        raise RestoreTargetError(f"{path} already exists; restore elsewhere or use --force")

    def _create_flags(self) -> int:
        excl = 0 if self.force else os.O_EXCL
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC | excl | os.O_NOFOLLOW

    def _replace(self, path: str) -> None:
        if self.force and os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)

    def _create_node(self, path: str, node: repo_pb2.Node, next_level: list) -> None:
        try:
            if node.type == repo_pb2.NODE_DIR:
                if os.path.lexists(path) and not os.path.isdir(path):
                    self._replace(path)
                os.makedirs(path, mode=0o700, exist_ok=True)
                self._dirs.append((path, node))
                self.result.dirs += 1
                next_level.append((path, node.subtree))
            elif node.type == repo_pb2.NODE_FILE:
                self._replace(path)
                chunks = tree.file_chunks(node, path)
                if len(chunks) == 1:
                    # One chunk: the file is created when its data arrives (one
                    # open instead of two; file creation dominates small files).
                    if os.path.lexists(path) and not self.force:
                        raise FileExistsError(path)
                    oid, offset, size = chunks[0]
                    self._targets[oid].append((path, -1, size))
                else:
                    fd = os.open(path, self._create_flags(), 0o600)
                    try:
                        os.ftruncate(fd, node.size)
                    finally:
                        os.close(fd)
                    for oid, offset, size in chunks:
                        self._targets[oid].append((path, offset, size))
                self._files.append((path, node))
                self.result.files += 1
            elif node.type == repo_pb2.NODE_SYMLINK:
                self._replace(path)
                os.symlink(node.link_target, os.fsencode(path))
                self._apply_meta(path, node, symlink=True)
                self.result.symlinks += 1
            else:
                self.warn(f"skipping {path}: unknown entry type {node.type}")
        except FileExistsError:
            raise RestoreTargetError(
                f"{path} already exists; restore elsewhere or use --force"
            ) from None
        except OSError as exc:
            raise PysrbupError(f"cannot create {path}: {exc.strerror}") from None

    # ---- data ------------------------------------------------------------

    def _write_chunk(self, oid: bytes, payload) -> None:
        places = self._targets[oid]
        if payload is not None:
            try:
                data = self.opener.open(oid, payload)
            except IntegrityError as exc:
                self.warn(str(exc))
                data = None
        else:
            data = None
        for path, offset, size in places:
            whole = offset < 0  # a one-chunk file, created now
            if data is None or len(data) != size:
                self._damage(path)
                if whole:  # it still exists, sized, as before
                    fd = os.open(path, self._create_flags(), 0o600)
                    os.ftruncate(fd, size)
                    os.close(fd)
                continue
            if whole:
                fd = os.open(path, self._create_flags(), 0o600)
                offset = 0
            else:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            self.progress.add_bytes(size)
            with self._lock:
                self.result.bytes_written += size

    def _restore_data(self) -> None:
        oids = list(self._targets)
        budget = _ByteBudget(PREFETCH_BYTES)
        seen: set[bytes] = set()

        def job(oid: bytes, payload, cost: int) -> None:
            try:
                self._write_chunk(oid, payload)
            finally:
                budget.release(cost)

        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="pysrbup-restore") as pool:
            futures = []
            for oid, status, payload, cost in self._prefetch(oids, budget):
                if oid not in self._targets or oid in seen:
                    budget.release(cost)
                    continue
                seen.add(oid)
                futures.append(pool.submit(job, oid, payload if status == 0 else None, cost))
                if len(futures) >= 4096:  # drop finished ones, surfacing failures early
                    for fut in futures:
                        if fut.done():
                            fut.result()
                    futures = [f for f in futures if not f.done()]
            for fut in futures:
                fut.result()
        for oid in oids:
            if oid not in seen:
                self._write_chunk(oid, None)

    def _prefetch(self, oids: list[bytes], budget: _ByteBudget):
        """Yields fetched records and their cost; a thread fetches ahead within ``budget``."""
        records: queue.Queue = queue.Queue()
        done = object()
        stop = threading.Event()

        def fetch() -> None:
            try:
                for batch in self._batches(oids):
                    for oid, status, payload in self.repo.conn.fetch_frames(batch):
                        cost = max(len(payload), MIN_RECORD_COST)
                        if not budget.acquire(cost, stop):
                            return
                        records.put((oid, status, payload, cost))
            except BaseException as exc:
                records.put(exc)
            finally:
                records.put(done)

        thread = threading.Thread(target=fetch, name="pysrbup-fetch", daemon=True)
        thread.start()
        try:
            while True:
                item = records.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _batches(self, oids: list[bytes]):
        batch: list[bytes] = []
        size = 0
        for oid in oids:
            batch.append(oid)
            size += self._targets[oid][0][2]
            if len(batch) >= FETCH_IDS or size >= FETCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    # ---- metadata --------------------------------------------------------

    def _apply_meta(self, path: str, node: repo_pb2.Node, symlink: bool = False) -> None:
        try:
            if self._as_root:
                os.chown(path, node.uid, node.gid, follow_symlinks=not symlink)
            if not symlink:
                os.chmod(path, node.mode)
            os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=not symlink)
        except OSError as exc:
            self.warn(f"cannot set metadata of {path}: {exc.strerror}")

    def run(self, backup_id: str, target: str) -> RestoreResult:
        """Restores ``backup_id`` into the directory ``target``."""
        info = self.repo.find_snapshot(backup_id)
        snap = self.repo.open_snapshot(info)
        self.result.backup_id = info.snapshot_id
        target = os.path.abspath(target)
        self.result.target = target
        if os.path.exists(target) and not os.path.isdir(target):
            raise RestoreTargetError(f"{target} exists and is not a directory")
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as exc:
            raise RestoreTargetError(f"cannot create {target}: {exc.strerror}") from None
        self.progress.set_total(snap.logical_bytes)
        try:
            self._create_tree(snap.root_tree, target)
            self._restore_data()
            for path, node in self._files:
                self._apply_meta(path, node)
            for path, node in sorted(self._dirs, key=lambda item: -item[0].count(os.sep)):
                self._apply_meta(path, node)
        finally:
            self.progress.close()
        self.result.damaged = sorted(self._damaged)
        if self.result.damaged:
            shown = ", ".join(self.result.damaged[:10])
            more = len(self.result.damaged) - 10
            raise IncompleteError(
                f"restored with errors: {len(self.result.damaged)} file(s) damaged or missing "
                f"in the repository: {shown}" + (f" and {more} more" if more > 0 else "")
            )
        return self.result
