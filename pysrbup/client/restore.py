"""Restoring a backup into a local directory.

First the directory trees are fetched level by level, and directories,
symlinks and (empty, pre-sized) files are created. Then every distinct chunk
is fetched once, in the server's pack order, verified (AEAD tag and keyed
MAC), and written with positioned writes at every offset where it belongs.
Metadata (modes, owners, mtimes) is applied as soon as an entry is complete
(a one-chunk file right after its write), directories last and deepest first,
so writing into them does not disturb their times.

Memory: what is to be written where is kept in flat arrays (``_Plan``, about
300 bytes per file and distinct chunk, not the tree's protobuf nodes), and the data
path reuses its memory: a few fetch streams run at once with at most
``INFLIGHT_BYTES`` of reply frames held, and each worker thread decrypts and
decompresses into its own buffers (``envelope.Buffers``) and writes from them.
Peak memory is therefore a constant (frames, buffers, the interpreter) plus
the plan, which grows with the files and distinct chunks of the backup
restored, not with the repository.

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
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pysrbup._native import fsops
from pysrbup.client.excludes import Excludes
from pysrbup.client.progress import Progress
from pysrbup.client.repository import FETCH_IDS, RemoteRepository
from pysrbup.client.safefs import (
    DIR_FLAGS,
    META_FLAGS,
    ROOT,
    DirTable,
)
from pysrbup.errors import IncompleteError, IntegrityError, PysrbupError, RestoreTargetError
from pysrbup.fileio import pwrite_all
from pysrbup.proto import repo_pb2
from pysrbup.repo import envelope, tree, wire
from pysrbup.textsafe import printable

#: Plaintext bytes asked for per fetch request (at most ``FETCH_IDS`` ids). The
#: server answers with frames of about 1 MiB (``servicer.FETCH_FRAME_BYTES``),
#: so frames stay alike in size and the allocator reuses their memory, while a
#: request costs its gRPC call once per 8 MiB instead of once per frame: a call
#: costs both sides about a millisecond of CPU (threads started and woken),
#: whatever its size. Against 1 MiB requests on 4 streams, with the page cache
#: dropped and a fresh ext4 each time (interleaved): the real tree restored in
#: 7.56-7.87 s instead of 8.63-10.23 s, server CPU 1.6 s instead of 2.3-2.8 s;
#: the 976 MB compare set in 1.78-2.25 s instead of 2.19-2.42 s; peak RSS +5 MiB.
FETCH_BYTES = 8 * 1024 * 1024
#: Fetch requests (streams) in flight at once. The server keeps a stream busy
#: through a long request (it sends the next frame while the client opens the
#: last), so two streams overlap one's tail with the other's start; four held
#: more frames in gRPC's buffers (+8 MiB peak RSS) and were no faster.
FETCH_STREAMS = 2
#: Reply frames held (received, not yet written) at most, in bytes: the data
#: path's memory. One frame is always let through.
INFLIGHT_BYTES = 4 * 1024 * 1024
#: Whole one-chunk files up to this size are made in batches, by one native call
#: per batch (their plaintext copied into the writer's arena); bigger ones one by one.
BATCH_FILE_MAX = 256 * 1024
#: Plaintext bytes per batch of small files: each writer thread's arena.
BATCH_BYTES = 1024 * 1024
#: All-zero chunks at least this big are left as holes (smaller ones cost less to write).
SPARSE_MIN = 64 * 1024
_ZEROS = bytes(64 * 1024)
#: Mode bits ``open`` cannot be trusted with (a later chown or write may clear them).
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def _umask() -> int:
    """This process's umask, read without changing it (Linux); all bits if unknown."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o7777


def _is_zero(data: memoryview) -> bool:
    """Whether ``data`` is all zero bytes (memcmp speed; most chunks fail at once)."""
    size = len(data)
    if not size or data[0] or data[-1]:
        return not size
    step = len(_ZEROS)
    return all(_ZEROS.startswith(data[at : at + step]) for at in range(0, size, step))


#: Rows every column of the plan starts with; a full column doubles.
_PLAN_ROWS = 4096


def _doubled(column, need: int) -> None:
    """Grows ``column`` (an array or bytearray) by doubling until it holds ``need`` items.

    Appending one item at a time grew a column by about 6% per step, and with
    other allocations in between each step copied the column to fresh pages:
    planning the 127k-entry real tree faulted in about 48 MB for 5 MB of arrays.
    Doubling copies each item about once. ``column`` must not be empty.
    """
    assert column
    while len(column) < need:
        column *= 2


class _Plan:
    """Where every chunk goes, in flat arrays: a few dozen bytes per place and file.

    Files are numbered: directory number, name (in one ``bytes`` blob), mode,
    mtime, owner, and extended attributes (rare, in a dict). Chunks are
    numbered by first sight; each has a chain of places (file, offset, size);
    offset -1 marks a one-chunk file, created when its data comes. The columns
    are allocated ahead (``_doubled``): rows from ``file_count`` and
    ``place_count`` on are not in use.
    """

    def __init__(self) -> None:
        self.chunk_of: dict[bytes, int] = {}
        self.oids: list[bytes] = []
        self.file_count = 0
        self.place_count = 0

        def column(typecode: str) -> array:
            return array(typecode, bytes(array(typecode).itemsize * _PLAN_ROWS))

        self.head = column("i")
        self.p_file = column("I")
        self.p_offset = column("q")
        self.p_size = column("I")
        self.p_next = column("i")
        self.f_dir = column("I")
        self.f_name = column("Q")  # end of the name in ``names``; it starts at the previous end
        self.f_mode = column("I")
        self.f_mtime = column("q")
        self.f_uid = column("I")
        self.f_gid = column("I")
        self.f_xattrs: dict[int, list[tuple[bytes, bytes]]] = {}
        self.names = bytearray(16 * _PLAN_ROWS)
        self._file_columns = (
            self.f_dir,
            self.f_name,
            self.f_mode,
            self.f_mtime,
            self.f_uid,
            self.f_gid,
        )
        self._place_columns = (self.p_file, self.p_offset, self.p_size, self.p_next)

    def add_file(self, dir_index: int, name: bytes, node: repo_pb2.Node, owner) -> int:
        """Numbers the file ``node`` in directory ``dir_index``; returns its number."""
        number = self.file_count
        self.file_count = number + 1
        if number == len(self.f_dir):
            for column in self._file_columns:
                _doubled(column, number + 1)
        start = self.f_name[number - 1] if number else 0  # the previous name's end
        end = start + len(name)
        if end > len(self.names):
            _doubled(self.names, end)
        self.names[start:end] = name
        self.f_dir[number] = dir_index
        self.f_name[number] = end
        self.f_mode[number] = node.mode
        self.f_mtime[number] = node.mtime_ns
        self.f_uid[number] = owner[0]
        self.f_gid[number] = owner[1]
        if node.xattrs:
            self.f_xattrs[number] = [(x.name, x.value) for x in node.xattrs]
        return number

    def add_place(self, oid: bytes, file: int, offset: int, size: int) -> None:
        """Chunk ``oid`` goes into ``file`` at ``offset`` (-1: the whole one-chunk file)."""
        chunk = self.chunk_of.get(oid)
        if chunk is None:
            chunk = self.chunk_of[oid] = len(self.oids)
            self.oids.append(oid)
            if chunk == len(self.head):
                _doubled(self.head, chunk + 1)
            self.head[chunk] = -1
        place = self.place_count
        self.place_count = place + 1
        if place == len(self.p_file):
            for column in self._place_columns:
                _doubled(column, place + 1)
        self.p_file[place] = file
        self.p_offset[place] = offset
        self.p_size[place] = size
        self.p_next[place] = self.head[chunk]
        self.head[chunk] = place

    def name(self, file: int) -> bytes:
        start = self.f_name[file - 1] if file else 0
        return bytes(self.names[start : self.f_name[file]])

    def meta(self, file: int) -> tuple[int, int, int, int]:
        """(mode, mtime_ns, uid, gid) of ``file``."""
        return self.f_mode[file], self.f_mtime[file], self.f_uid[file], self.f_gid[file]

    def places(self, chunk: int) -> Iterator[tuple[int, int, int]]:
        """(file, offset, size) of every place of ``chunk``."""
        place = self.head[chunk]
        while place >= 0:
            yield self.p_file[place], self.p_offset[place], self.p_size[place]
            place = self.p_next[place]


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
        self._plan = _Plan()
        #: Files of several chunks (numbers in the plan): metadata once all data is written.
        self._files = array("I")
        #: (directory, depth, (mode, mtime_ns, uid, gid), xattrs) of every directory restored.
        self._dirs: list[tuple[int, int, tuple[int, int, int, int], list | None]] = []
        self._damaged: set[str] = set()
        #: (device, inode) of a hard-linked file -> where its first path was restored.
        self._first_links: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._warned: set[str] = set()
        self._owners: dict[tuple, tuple[int, int]] = {}
        #: Per directory number: 1 if a file created in it gets this process's uid
        #: and gid (made by this run, no set-group-ID), so chown can be skipped.
        self._own_dirs = bytearray()
        self._ids = (os.geteuid(), os.getegid())
        self._umask = _umask()
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
            # Each tree is used as it arrives and dropped: a level's trees are not all held.
            waiting: dict[bytes, list[tuple[int, str, bytes, bool, int]]] = defaultdict(list)
            for item in level:
                waiting[item[2]].append(item)
            next_level: list[tuple[int, str, bytes, bool, int]] = []
            for oid, plain in self._fetch_objects(list(waiting)):
                nodes = None
                for index, path, _, fresh, depth in waiting.pop(oid, ()):
                    if plain is None:
                        self._damage(path)
                        continue
                    if nodes is None:
                        nodes = tree.parse(plain, path).nodes
                    try:
                        dir_fd = self._table.acquire(index)
                    except OSError as exc:
                        raise PysrbupError(
                            f"cannot open {printable(path)}: {exc.strerror}"
                        ) from None
                    try:
                        for node in nodes:
                            self._create_node(dir_fd, index, path, node, fresh, depth, next_level)
                    finally:
                        self._table.release(index)
                del nodes, plain
            for items in waiting.values():  # not answered at all
                for item in items:
                    self._damage(item[1])
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
                assert index == len(self._own_dirs)
                self._own_dirs.append(created and self._own_dirs[dir_index])
                xattrs = [(x.name, x.value) for x in node.xattrs] or None
                self._dirs.append((index, depth + 1, self._meta(node), xattrs))
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
                    number = self._plan.add_file(dir_index, name, node, self._owner_ids(node))
                    self._plan.add_place(oid, number, -1, size)
                else:
                    xattrs = [(x.name, x.value) for x in node.xattrs]
                    fd = os.open(name, fsops.CREATE_FLAGS, 0o600, dir_fd=dir_fd)
                    try:
                        if node.size:
                            os.ftruncate(fd, node.size)
                        self._apply_xattrs(fd, xattrs, path)
                        if not chunks:  # empty: complete already
                            self._apply_meta(fd, self._meta(node), path)
                    finally:
                        os.close(fd)
                    if node.links > 1:
                        self._first_links[(node.device, node.inode)] = (dir_index, name)
                    if chunks:
                        number = self._plan.add_file(dir_index, name, node, self._owner_ids(node))
                        self._plan.f_xattrs.pop(number, None)  # set already
                        for oid, offset, size in chunks:
                            self._plan.add_place(oid, number, offset, size)
                        self._files.append(number)
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

    def _owner_ids(self, node: repo_pb2.Node) -> tuple[int, int]:
        """The owner to give ``node`` (root only: nobody else can give files away)."""
        return self._owner(node) if self._as_root else (0, 0)

    def _meta(self, node: repo_pb2.Node) -> tuple[int, int, int, int]:
        """(mode, mtime_ns, uid, gid) to apply: the node's metadata, without the node."""
        return (node.mode, node.mtime_ns, *self._owner_ids(node))

    def _apply_xattrs(self, fd: int, xattrs, path: str) -> None:
        """Sets extended attributes (name, value) on ``fd``; one warning per kind refused."""
        for raw_name, value in xattrs or ():
            name = os.fsdecode(raw_name)
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                kind = name.split(".", 1)[0]
                self._warn_once(
                    f"xattr {kind}",
                    f"cannot restore {kind}.* extended attributes (e.g. on {printable(path)}): "
                    f"{exc.strerror}",
                )

    # ---- data ------------------------------------------------------------

    def _file_path(self, file: int) -> str:
        """The path of planned file ``file``, for messages."""
        assert self._table is not None
        where = self._table.path(self._plan.f_dir[file], self.result.target)
        return os.path.join(where, os.fsdecode(self._plan.name(file)))

    def planned(self) -> dict[bytes, list[tuple[str, int, int]]]:
        """Chunk id -> (path, offset, size) of every place it is written (-1: whole file)."""
        return {
            oid: [(self._file_path(f), o, n) for f, o, n in self._plan.places(chunk)]
            for oid, chunk in self._plan.chunk_of.items()
        }

    def _write_chunk(self, chunk: int, data: memoryview | None) -> None:
        """Writes verified ``data`` (None: missing or damaged) wherever chunk ``chunk`` goes."""
        plan = self._plan
        table = self._table
        assert table is not None
        # An all-zero chunk is not written into a file that was sized with
        # ftruncate: the file keeps a hole there (sparse files come back sparse).
        sparse = None
        for file, offset, size in plan.places(chunk):
            good = data is not None and len(data) == size
            if not good:
                self._damage(self._file_path(file))
                if offset >= 0:
                    continue
            elif offset >= 0 and sparse is None:
                sparse = size >= SPARSE_MIN and _is_zero(data)
            if offset < 0 and file not in plan.f_xattrs:  # a one-chunk file: made complete
                self._create_files([(file, data if good else None, size)])
                continue
            dir_index = plan.f_dir[file]
            name = plan.name(file)
            dir_fd = self._acquire_dir_of(file)
            try:
                if offset < 0:  # a one-chunk file with extended attributes
                    self._create_with_xattrs(dir_fd, file, data if good else None, size)
                elif sparse:  # a run of zeros in a pre-sized file: leave the hole
                    pass
                else:
                    fsops.write_at(dir_fd, name, data, offset)
            except OSError as exc:
                raise PysrbupError(
                    f"cannot write {printable(self._file_path(file))}: {exc.strerror}"
                ) from None
            finally:
                table.release(dir_index)
            if good:
                self._count_written(size)

    def _acquire_dir_of(self, file: int) -> int:
        """The fd of planned ``file``'s directory, pinned until released; a clear error if gone."""
        assert self._table is not None
        try:
            return self._table.acquire(self._plan.f_dir[file])
        except OSError as exc:
            raise PysrbupError(
                f"cannot write {printable(self._file_path(file))}: {exc.strerror}"
            ) from None

    def _count_written(self, size: int) -> None:
        self.progress.add_bytes(size)
        with self._lock:
            self.result.bytes_written += size

    def _create_with_xattrs(self, dir_fd: int, file: int, data, size: int) -> None:
        """Creates planned one-chunk ``file`` with ``data`` (None: a hole), its xattrs, metadata."""
        plan = self._plan
        fd = os.open(plan.name(file), fsops.CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            if data is not None:
                pwrite_all(fd, data, 0)
            else:  # it still exists, sized, as before
                os.ftruncate(fd, size)
            self._apply_xattrs(fd, plan.f_xattrs[file], self._file_path(file))
            self._apply_meta(fd, plan.meta(file), file)
        finally:
            os.close(fd)

    def _single_file(self, chunk: int) -> int:
        """The file ``chunk`` is the whole of, if that is its only place (and no xattrs); or -1."""
        plan = self._plan
        place = plan.head[chunk]
        if plan.p_next[place] >= 0 or plan.p_offset[place] >= 0:
            return -1
        file = plan.p_file[place]
        return -1 if file in plan.f_xattrs else file

    def _create_files(self, files: list[tuple[int, memoryview | None, int]]) -> None:
        """Makes planned one-chunk files (number, data or None for a hole, size), complete.

        One native call (``fsops``) for them all: each file is created with its
        final mode where the umask allows, and chown is left out where the new
        file is its owner's already.
        """
        plan = self._plan
        table = self._table
        assert table is not None
        entries = []
        pinned = []
        try:
            for file, data, size in files:
                dir_index = plan.f_dir[file]
                dir_fd = self._acquire_dir_of(file)
                pinned.append(dir_index)
                mode, mtime_ns, uid, gid = plan.meta(file)
                mode &= 0o7777
                open_mode, chmod_mode = 0o600, mode
                if not mode & (_SPECIAL_BITS | self._umask):
                    open_mode, chmod_mode = mode, -1
                if not self._as_root or (self._own_dirs[dir_index] and (uid, gid) == self._ids):
                    uid = gid = -1
                name = plan.name(file)
                entries.append(
                    (dir_fd, name, data, size, open_mode, chmod_mode, uid, gid, mtime_ns)
                )
            results = fsops.create_files(entries)
        finally:
            for dir_index in pinned:
                table.release(dir_index)
        written = 0
        for (file, data, size), failed in zip(files, results, strict=True):
            if failed < 0:
                raise PysrbupError(
                    f"cannot write {printable(self._file_path(file))}: {os.strerror(-failed)}"
                )
            if failed:
                self.warn(
                    f"cannot set metadata of {printable(self._file_path(file))}: "
                    f"{os.strerror(failed)}"
                )
            if data is not None:
                written += size
        if written:
            self._count_written(written)

    def _restore_data(self) -> None:
        """Fetches every planned chunk once and writes it everywhere it goes.

        ``FETCH_STREAMS`` threads fetch batches (one request each) and queue
        the reply frames, holding at most ``INFLIGHT_BYTES`` of them; worker
        threads open each frame's records into their own buffers and write
        them. Small whole files are gathered into the worker's arena and made
        by one native call per batch, so a worker writes files while another
        holds the interpreter lock to open records.
        """
        plan = self._plan
        count = len(plan.oids)
        if not count:
            return
        done = bytearray(count)
        budget = _ByteBudget(INFLIGHT_BYTES)
        work: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        failures: list[BaseException] = []
        batches = self._batches()
        batches_lock = threading.Lock()

        def fail(exc: BaseException) -> None:
            failures.append(exc)
            stop.set()

        def fetch() -> None:
            try:
                while not stop.is_set():
                    with batches_lock:
                        batch = next(batches, None)
                    if batch is None:
                        return
                    ids = [plan.oids[chunk] for chunk in batch]
                    for size, records in self.repo.conn.fetch_frame_records(ids):
                        with self._lock:
                            self.result.bytes_fetched += sum(len(r[2]) for r in records)
                        if not records:
                            continue
                        if not budget.acquire(size, stop):
                            return
                        work.put((size, list(records)))
                        records.clear()  # the queue holds the frame now, not this thread
            except BaseException as exc:
                fail(exc)

        def write() -> None:
            buffers = envelope.Buffers()
            arena = memoryview(bytearray(BATCH_BYTES))
            opener = self.opener
            while (item := work.get()) is not None:
                size, records = item
                del item
                small: list[tuple[int, memoryview | None, int]] = []
                used = 0
                try:
                    for oid, status, payload in records:
                        chunk = plan.chunk_of[oid]
                        if stop.is_set() or done[chunk]:
                            continue
                        done[chunk] = 1
                        data = None
                        if status == wire.FETCH_FOUND:
                            try:
                                data = opener.open_into(oid, payload, buffers)
                            except IntegrityError as exc:
                                self.warn(str(exc))
                        want = plan.p_size[plan.head[chunk]]
                        file = self._single_file(chunk) if want <= BATCH_FILE_MAX else -1
                        if file < 0 or data is None or len(data) != want:
                            self._write_chunk(chunk, data)  # also what is missing or damaged
                            continue
                        if used + want > len(arena):
                            self._create_files(small)
                            small, used = [], 0
                        arena[used : used + want] = data
                        small.append((file, arena[used : used + want], want))
                        used += want
                    data = payload = None
                    if small:
                        self._create_files(small)
                except BaseException as exc:
                    fail(exc)
                finally:
                    records = small = data = payload = None
                    budget.release(size)

        fetchers = [
            threading.Thread(target=fetch, name=f"pysrbup-fetch-{n}", daemon=True)
            for n in range(FETCH_STREAMS)
        ]
        writers = [
            threading.Thread(target=write, name=f"pysrbup-restore-{n}", daemon=True)
            for n in range(self.num_threads)
        ]
        for thread in fetchers + writers:
            thread.start()
        try:
            for thread in fetchers:
                thread.join()
        finally:
            for _ in writers:
                work.put(None)
            for thread in writers:
                thread.join()
        if failures:
            raise failures[0]
        for chunk in range(count):
            if not done[chunk]:  # the server did not answer for it at all
                self._write_chunk(chunk, None)

    def _batches(self) -> Iterator[list[int]]:
        """Chunk numbers per fetch request: at most FETCH_IDS, and FETCH_BYTES if several."""
        plan = self._plan
        batch: list[int] = []
        size = 0
        for chunk in range(len(plan.oids)):
            chunk_size = plan.p_size[plan.head[chunk]]
            if batch and (len(batch) >= FETCH_IDS or size + chunk_size > FETCH_BYTES):
                yield batch
                batch, size = [], 0
            batch.append(chunk)
            size += chunk_size
        if batch:
            yield batch

    # ---- metadata --------------------------------------------------------

    def _apply_meta(self, fd: int, meta: tuple[int, int, int, int], path: str | int) -> None:
        """Sets owner (as root), mode and mtime of the file or directory open as ``fd``.

        ``path`` names it in a warning (a planned file's number stands for its path).
        """
        mode, mtime_ns, uid, gid = meta
        try:
            if self._as_root:
                os.chown(fd, uid, gid)
            os.chmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            shown = self._file_path(path) if isinstance(path, int) else path
            self.warn(f"cannot set metadata of {printable(shown)}: {exc.strerror}")

    def _apply_link_meta(self, dir_fd: int, name: bytes, path: str, node: repo_pb2.Node) -> None:
        """Sets owner (as root) and mtime of the symlink itself."""
        try:
            if self._as_root:
                os.chown(name, *self._owner(node), dir_fd=dir_fd, follow_symlinks=False)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")

    def _finish_file(self, file: int) -> None:
        """Metadata of a file of several chunks, once all its data is written."""
        assert self._table is not None
        dir_index = self._plan.f_dir[file]
        try:
            dir_fd = self._table.acquire(dir_index)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(self._file_path(file))}: {exc.strerror}")
            return
        try:
            fd = os.open(self._plan.name(file), META_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(self._file_path(file))}: {exc.strerror}")
            return
        finally:
            self._table.release(dir_index)
        try:
            self._apply_meta(fd, self._plan.meta(file), file)
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

    def _finish_dir(self, index: int, meta: tuple[int, int, int, int], xattrs) -> None:
        assert self._table is not None
        path = self._table.path(index, self.result.target)
        try:
            fd = self._table.acquire(index)
        except OSError as exc:
            self.warn(f"cannot set metadata of {printable(path)}: {exc.strerror}")
            return
        try:
            self._apply_xattrs(fd, xattrs, path)
            self._apply_meta(fd, meta, path)
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
        root = os.fstat(root_fd)
        plain_root = not root.st_mode & stat.S_ISGID and root.st_gid == self._ids[1]
        self._own_dirs[:] = b"\1" if plain_root else b"\0"
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
            for file in self._files:
                self._finish_file(file)
            for index, _depth, meta, xattrs in sorted(self._dirs, key=lambda item: -item[1]):
                self._finish_dir(index, meta, xattrs)
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
