"""Restoring a backup into a local directory.

First the directory trees are fetched level by level, and directories,
symlinks and (empty, pre-sized) files are created. Then every distinct chunk
is fetched once, in the server's pack order, verified (AEAD tag and keyed
MAC), and written with positioned writes at every offset where it belongs.
Metadata (modes, owners, mtimes) is applied as soon as an entry is complete
(a one-chunk file right after its write), directories last and deepest first,
so writing into them does not disturb their times.

Restore never leaves its target (see ``safefs``): everything is created
relative to directory fds opened with ``O_NOFOLLOW`` from the target's fd, so
a symlink found in the target is never followed. Without ``--force`` an
existing entry is an error; with it, a symlink or file in the way is unlinked
and replaced, and a directory in the way of a file only if it is empty. Trees
with invalid or duplicate names are refused, and names are shown with their
control characters escaped.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pysrbup.client.excludes import Excludes
from pysrbup.client.progress import Progress
from pysrbup.client.repository import FETCH_IDS, RemoteRepository
from pysrbup.client.safefs import (
    CREATE_FLAGS,
    DIR_FLAGS,
    META_FLAGS,
    ROOT,
    WRITE_FLAGS,
    DirTable,
)
from pysrbup.errors import IncompleteError, IntegrityError, PysrbupError, RestoreTargetError
from pysrbup.memtune import RESTORE_MMAP_THRESHOLD, tune_malloc
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree, wire
from pysrbup.textsafe import printable

FETCH_BYTES = 64 * 1024 * 1024
#: Payload bytes fetched ahead of (or held by) the decrypting workers. Records
#: are views into the server's frames (up to 8 MiB each), so this also bounds
#: how many frames stay alive: 16 records ahead pinned up to 16 frames.
PREFETCH_BYTES = 24 * 1024 * 1024
#: Small records count as this much, so at most a few hundred are in flight.
MIN_RECORD_COST = 64 * 1024
#: All-zero chunks at least this big are left as holes (smaller ones cost less to write).
SPARSE_MIN = 64 * 1024


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
    specials: int = 0
    bytes_written: int = 0
    bytes_fetched: int = 0
    damaged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "backup_id": self.backup_id,
            "target": self.target,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "specials": self.specials,
            "bytes_fetched": self.bytes_fetched,
            "bytes_written": self.bytes_written,
            "damaged": self.damaged,
        }


def _exists(path: str) -> RestoreTargetError:
    return RestoreTargetError(f"{printable(path)} already exists; restore elsewhere or use --force")


class Restore:
    """One restore run."""

    def __init__(
        self,
        repo: RemoteRepository,
        num_threads: int = 2,
        force: bool = False,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
        numeric_owner: bool = False,
        includes: list[str] | None = None,
        excludes: list[str] | None = None,
    ):
        tune_malloc(RESTORE_MMAP_THRESHOLD)
        self.repo = repo
        self.numeric_owner = numeric_owner
        self.opener = repo.opener
        self.num_threads = max(1, num_threads)
        self.force = force
        self.progress = progress or Progress("restore", enabled=False)
        self.warn = warn or (
            lambda message: print(f"warning: {printable(message)}", file=sys.stderr)
        )
        self.result = RestoreResult()
        self._as_root = os.geteuid() == 0
        self._table: DirTable | None = None
        # chunk id -> (directory, name, path, offset, size, node of a one-chunk file or None)
        self._targets: dict[bytes, list[tuple[int, bytes, str, int, int, repo_pb2.Node | None]]]
        self._targets = defaultdict(list)
        #: Files of several chunks, whose metadata waits until all their data is written.
        self._files: list[tuple[int, bytes, str, repo_pb2.Node]] = []
        #: (directory, path, node, depth) of every directory restored.
        self._dirs: list[tuple[int, str, repo_pb2.Node, int]] = []
        self._damaged: set[str] = set()
        #: (device, inode) of a hard-linked file -> where its first path was restored.
        self._first_links: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._warned: set[str] = set()
        self._owners: dict[tuple, tuple[int, int]] = {}
        # The backup's pattern rules, applied to paths below the target.
        self._includes = Excludes.from_options(exclude=includes) if includes else None
        self._excludes = Excludes.from_options(exclude=excludes)
        #: Relative paths to restore (None: everything).
        self._wanted: set[str] | None = None
        self._tree_cache: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    # ---- trees -----------------------------------------------------------

    def _fetch_objects(self, oids: list[bytes]):
        """Yields (id, plaintext or None) for ``oids``; None when missing or damaged.

        Trees the selection pass already fetched come from its cache.
        """
        wanted = []
        for oid in oids:
            if oid in self._tree_cache:
                yield oid, self._tree_cache.pop(oid)
            else:
                wanted.append(oid)
        for oid, plain, problem in self.repo.fetch_objects(wanted):
            if plain is None:
                self.warn(problem)
            else:
                self.result.bytes_fetched += len(plain)
            yield oid, plain

    def _select(self, root_nodes: list[repo_pb2.Node]) -> None:
        """With --include/--exclude: which paths to restore, walking only the trees needed.

        Paths are relative to the restore target (``src/sub/file``). A path is
        restored when no exclude pattern matches it and, if there are include
        patterns, one matches it or a directory above it; directories on the
        way to a restored path are restored too. A directory no include
        pattern can match below (anchored patterns, ``/src/sub/file``) is not
        read. The trees fetched are kept for the restore itself.
        """
        level = [("", node, False) for node in root_nodes]
        while level:
            descend = []
            for parent, node, included in level:
                path = f"{parent}/{os.fsdecode(node.name)}" if parent else os.fsdecode(node.name)
                if self._excludes.excluded(path):
                    continue  # and nothing below it
                here = included or self._includes is None or self._includes.excluded(path)
                if here:
                    self._mark(path)
                if node.type == repo_pb2.NODE_DIR and (
                    here or self._includes.may_match_below(path)  # anchored includes prune
                ):
                    descend.append((path, node, here))
            plains = dict(self._fetch_trees([node.subtree for _, node, _ in descend]))
            level = []
            for path, node, here in descend:
                plain = plains.get(node.subtree)
                if plain is not None:
                    level += [(path, child, here) for child in tree.parse(plain, path).nodes]

    def _fetch_trees(self, oids: list[bytes]):
        """Fetches tree objects for the selection pass and keeps them for the restore."""
        for oid, plain in self._fetch_objects(list(dict.fromkeys(oids))):
            if plain is not None:
                self._tree_cache[oid] = plain
            yield oid, plain

    def _mark(self, path: str) -> None:
        """Restores ``path`` and the directories above it."""
        while path and path not in self._wanted:
            self._wanted.add(path)
            path = os.path.dirname(path)

    def _damage(self, path: str) -> None:
        with self._lock:
            self._damaged.add(path)

    def _create_tree(
        self, root_tree: bytes, target: str, root_nodes: list[repo_pb2.Node] | None = None
    ) -> None:
        """Creates the entries of ``root_tree`` (or ``root_nodes``) in ``target``, and below."""
        assert self._table is not None
        # (directory, path, tree id, created empty by this run, depth)
        level: list[tuple[int, str, bytes, bool, int]] = [(ROOT, target, root_tree, False, 0)]
        if root_nodes is not None:  # given as nodes: nothing to fetch for the top
            self._tree_cache[root_tree] = tree.serialize(root_nodes)
        while level:
            found = dict(self._fetch_objects(list({item[2]: None for item in level})))
            next_level: list[tuple[int, str, bytes, bool, int]] = []
            for index, path, oid, fresh, depth in level:
                plain = found.get(oid)
                if plain is None:
                    self._damage(path)
                    continue
                nodes = tree.parse(plain, path).nodes
                try:
                    dir_fd = self._table.acquire(index)
                except OSError as exc:
                    raise PysrbupError(f"cannot open {printable(path)}: {exc.strerror}") from None
                try:
                    for node in nodes:
                        self._create_node(dir_fd, index, path, node, fresh, depth, next_level)
                finally:
                    self._table.release(index)
            level = next_level

    def _clear(self, dir_fd: int, name: bytes, path: str, what: str) -> None:
        """Makes way for a new ``what`` (file, symlink) ``name``: --force removes what is there."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        if not self.force:
            raise _exists(path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)  # a file or symlink: the link itself, not its target
            return
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise RestoreTargetError(
                f"{printable(path)} is a directory that is not empty, where the backup has "
                f"a {what}; move it away or restore elsewhere"
            ) from None

    def _make_dir(self, dir_fd: int, name: bytes, path: str, top: bool) -> bool:
        """Creates directory ``name`` or reuses a real one; True if created (so empty)."""
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            return True
        except FileExistsError:
            pass
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISDIR(st.st_mode):
            if top and not self.force:  # restoring into an existing, empty directory is fine
                fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    if os.listdir(fd):
                        raise _exists(path)
                finally:
                    os.close(fd)
            return False
        if not self.force:
            raise _exists(path)
        os.unlink(name, dir_fd=dir_fd)  # a symlink (or file) in the way: never followed
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        return True

    def _create_node(
        self,
        dir_fd: int,
        dir_index: int,
        parent: str,
        node: repo_pb2.Node,
        fresh: bool,
        depth: int,
        next_level: list,
    ) -> None:
        """Creates ``node`` in the directory ``dir_fd``; ``fresh``: that one was empty."""
        name = node.name
        path = os.path.join(parent, os.fsdecode(name))
        wanted = self._wanted
        if wanted is not None and os.path.relpath(path, self.result.target) not in wanted:
            return  # left out by --include / --exclude
        try:
            if node.type == repo_pb2.NODE_DIR:
                created = self._make_dir(dir_fd, name, path, top=depth == 0)
                assert self._table is not None
                index = self._table.add(dir_index, name)
                self._dirs.append((index, path, node, depth + 1))
                self.result.dirs += 1
                next_level.append((index, path, node.subtree, created, depth + 1))
            elif node.type == repo_pb2.NODE_FILE:
                chunks = tree.file_chunks(node, printable(path))
                if not fresh:
                    self._clear(dir_fd, name, path, "file")
                if node.links > 1 and self._link_to_earlier(dir_fd, dir_index, name, node):
                    self.result.files += 1
                    return
                if len(chunks) == 1 and node.links <= 1:
                    # One chunk: the file is created when its data arrives (one
                    # open instead of two; file creation dominates small files).
                    oid, offset, size = chunks[0]
                    self._targets[oid].append((dir_index, name, path, -1, size, node))
                else:
                    fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
                    try:
                        if node.size:
                            os.ftruncate(fd, node.size)
                        self._apply_xattrs(fd, node, path)
                        if not chunks:  # empty: complete already
                            self._apply_meta(fd, node, path)
                    finally:
                        os.close(fd)
                    if node.links > 1:
                        self._first_links[(node.device, node.inode)] = (dir_index, name)
                    if chunks:
                        for oid, offset, size in chunks:
                            self._targets[oid].append((dir_index, name, path, offset, size, None))
                        self._files.append((dir_index, name, path, node))
                self.result.files += 1
            elif node.type == repo_pb2.NODE_SYMLINK:
                if not fresh:
                    self._clear(dir_fd, name, path, "symlink")
                os.symlink(node.link_target, name, dir_fd=dir_fd)
                self._apply_link_meta(dir_fd, name, path, node)
                self.result.symlinks += 1
            elif node.type in (
                repo_pb2.NODE_FIFO,
                repo_pb2.NODE_CHARDEV,
                repo_pb2.NODE_BLOCKDEV,
            ):
                self._make_special(dir_fd, name, path, node, fresh)
            else:
                self.warn(f"skipping {printable(path)}: unknown entry type {node.type}")
        except FileExistsError:
            raise _exists(path) from None
        except OSError as exc:
            raise PysrbupError(f"cannot create {printable(path)}: {exc.strerror}") from None

    def _link_to_earlier(self, dir_fd: int, dir_index: int, name: bytes, node) -> bool:
        """Makes ``name`` a hard link to the file restored for the same inode; False if first."""
        first = self._first_links.get((node.device, node.inode))
        if first is None:
            return False
        first_index, first_name = first
        assert self._table is not None
        src_fd = self._table.acquire(first_index)
        try:
            os.link(first_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            self._table.release(first_index)
        return True

    def _make_special(self, dir_fd: int, name: bytes, path: str, node, fresh: bool) -> None:
        """A FIFO, or (as root) a character or block device."""
        if not fresh:
            self._clear(dir_fd, name, path, "special file")
        if node.type == repo_pb2.NODE_FIFO:
            os.mkfifo(name, 0o600, dir_fd=dir_fd)
        elif not self._as_root:
            self._warn_once("device", f"not restoring device {printable(path)}: needs root")
            return
        else:
            kind = stat.S_IFCHR if node.type == repo_pb2.NODE_CHARDEV else stat.S_IFBLK
            os.mknod(name, kind | 0o600, node.rdev, dir_fd=dir_fd)
        try:
            if self._as_root:
                os.chown(name, *self._owner(node), dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(name, node.mode, dir_fd=dir_fd)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")
        self.result.specials += 1

    def _owner(self, node: repo_pb2.Node) -> tuple[int, int]:
        """(uid, gid) to restore: by name when the name exists here, else by id (restic's rule).

        ``numeric_owner`` uses the ids as recorded.
        """
        if self.numeric_owner:
            return node.uid, node.gid
        key = (node.user, node.group, node.uid, node.gid)
        found = self._owners.get(key)
        if found is None:
            import grp
            import pwd

            try:
                uid = pwd.getpwnam(node.user).pw_uid if node.user else node.uid
            except KeyError:
                uid = node.uid
            try:
                gid = grp.getgrnam(node.group).gr_gid if node.group else node.gid
            except KeyError:
                gid = node.gid
            found = self._owners[key] = (uid, gid)
        return found

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        self.warn(message + " (said once for all such entries)")

    def _apply_xattrs(self, fd: int, node: repo_pb2.Node, path: str) -> None:
        """Sets the node's extended attributes on ``fd``; one warning per kind refused."""
        for attr in node.xattrs:
            name = os.fsdecode(attr.name)
            try:
                os.setxattr(fd, name, attr.value)
            except OSError as exc:
                kind = name.split(".", 1)[0]
                self._warn_once(
                    f"xattr {kind}",
                    f"cannot restore {kind}.* extended attributes (e.g. on {printable(path)}): "
                    f"{exc.strerror}",
                )

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
        table = self._table
        assert table is not None
        # An all-zero chunk is not written into a file that was sized with
        # ftruncate: the file keeps a hole there (sparse files come back sparse).
        sparse = data is not None and len(data) >= SPARSE_MIN and data.count(0) == len(data)
        for dir_index, name, path, offset, size, whole in places:
            good = data is not None and len(data) == size
            if not good:
                self._damage(path)
                if whole is None:
                    continue
            try:
                dir_fd = table.acquire(dir_index)
            except OSError as exc:
                raise PysrbupError(f"cannot write {printable(path)}: {exc.strerror}") from None
            try:
                if whole is not None:  # a one-chunk file: created now, and complete
                    fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
                    try:
                        if good:
                            os.pwrite(fd, data, 0)
                        else:  # it still exists, sized, as before
                            os.ftruncate(fd, size)
                        self._apply_xattrs(fd, whole, path)
                        self._apply_meta(fd, whole, path)
                    finally:
                        os.close(fd)
                elif sparse:  # a run of zeros in a pre-sized file: leave the hole
                    pass
                else:
                    fd = os.open(name, WRITE_FLAGS, dir_fd=dir_fd)
                    try:
                        os.pwrite(fd, data, offset)
                    finally:
                        os.close(fd)
            except OSError as exc:
                raise PysrbupError(f"cannot write {printable(path)}: {exc.strerror}") from None
            finally:
                table.release(dir_index)
            if not good:
                continue
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
                found = payload if status == wire.FETCH_FOUND else None
                futures.append(pool.submit(job, oid, found, cost))
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
                        self.result.bytes_fetched += len(payload)
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
            size += self._targets[oid][0][4]
            if len(batch) >= FETCH_IDS or size >= FETCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    # ---- metadata --------------------------------------------------------

    def _apply_meta(self, fd: int, node: repo_pb2.Node, path: str) -> None:
        """Sets owner (as root), mode and mtime of the file or directory open as ``fd``."""
        try:
            if self._as_root:
                os.chown(fd, *self._owner(node))
            os.chmod(fd, node.mode)
            os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")

    def _apply_link_meta(self, dir_fd: int, name: bytes, path: str, node: repo_pb2.Node) -> None:
        """Sets owner (as root) and mtime of the symlink itself."""
        try:
            if self._as_root:
                os.chown(name, *self._owner(node), dir_fd=dir_fd, follow_symlinks=False)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")

    def _finish_file(self, dir_index: int, name: bytes, path: str, node: repo_pb2.Node) -> None:
        """Metadata of a file of several chunks, once all its data is written."""
        assert self._table is not None
        try:
            dir_fd = self._table.acquire(dir_index)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")
            return
        try:
            fd = os.open(name, META_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")
            return
        finally:
            self._table.release(dir_index)
        try:
            self._apply_meta(fd, node, path)
        finally:
            os.close(fd)

    def _subtree(
        self, snap: repo_pb2.Snapshot, subpath: str, backup_id: str
    ) -> tuple[bytes, list[repo_pb2.Node] | None]:
        """(tree id, or a stand-in with the nodes) of ``subpath`` to restore as the root."""
        from pysrbup.client.browse import Trees, locate

        _, node = locate(Trees(self.repo), snap, subpath, backup_id)
        if node.type == repo_pb2.NODE_DIR:
            return node.subtree, None
        return b"subpath:" + node.name, [node]

    def _finish_dir(self, index: int, path: str, node: repo_pb2.Node) -> None:
        assert self._table is not None
        try:
            fd = self._table.acquire(index)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")
            return
        try:
            self._apply_xattrs(fd, node, path)
            self._apply_meta(fd, node, path)
        finally:
            self._table.release(index)

    def run(self, backup_id: str, target: str) -> RestoreResult:
        """Restores ``backup_id`` into the directory ``target``.

        ``ID:sub/path`` restores that part of the backup as the root: the
        contents of a directory (or the file) go straight into ``target``, as
        restic does.
        """
        backup_id, _, subpath = backup_id.partition(":")
        info = self.repo.find_snapshot(backup_id)
        snap = self.repo.open_snapshot(info)
        root_tree, root_nodes = snap.root_tree, None
        if subpath.strip("/"):
            root_tree, root_nodes = self._subtree(snap, subpath, info.snapshot_id)
        self.result.backup_id = info.snapshot_id
        target = os.path.abspath(target)
        self.result.target = target
        if os.path.exists(target) and not os.path.isdir(target):
            raise RestoreTargetError(f"{printable(target)} exists and is not a directory")
        try:
            os.makedirs(target, exist_ok=True)
            # The target itself may be a symlink (the user's choice): followed once,
            # here; everything below is reached from this fd, never through a symlink.
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RestoreTargetError(f"cannot create {printable(target)}: {exc.strerror}") from None
        self._table = DirTable(root_fd)
        self.progress.set_total(snap.logical_bytes)
        try:
            if self._includes is not None or self._excludes.patterns:
                self._wanted = set()
                top = root_nodes
                if top is None:
                    plain = dict(self._fetch_trees([root_tree])).get(root_tree)
                    top = list(tree.parse(plain, target).nodes) if plain is not None else []
                self._select(top)
            self._create_tree(root_tree, target, root_nodes)
            self._restore_data()
            for dir_index, name, path, node in self._files:
                self._finish_file(dir_index, name, path, node)
            for index, path, node, _depth in sorted(self._dirs, key=lambda item: -item[3]):
                self._finish_dir(index, path, node)
        finally:
            self._table.close()
            self.progress.close()
        self.result.damaged = sorted(self._damaged)
        if self.result.damaged:
            shown = ", ".join(printable(path) for path in self.result.damaged[:10])
            more = len(self.result.damaged) - 10
            raise IncompleteError(
                f"restored with errors: {len(self.result.damaged)} file(s) damaged or missing "
                f"in the repository: {shown}" + (f" and {more} more" if more > 0 else "")
            )
        return self.result
