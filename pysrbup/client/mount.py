"""A read-only FUSE file system over a repository's backups (``pysrbup-client mount``).

The mount shows::

    ids/<backup id>/...        each backup: the backed-up directory's contents
    snapshots/<time>           -> ../ids/<backup id>, one per backup, local time
    snapshots/latest           -> the newest backup

Nothing is fetched until it is looked at: a directory's tree when the
directory is first looked up or listed (its subdirectories' trees are then
fetched in the background, in one request, because ``ls -R`` and ``find``
go there next), a file's chunks when its bytes are read. Sequential reads
fetch ``READAHEAD_BYTES`` ahead in the background. Parsed directories and
chunk plaintext are kept in two caches bounded by bytes, so memory depends
on those bounds and on what is open, not on the size of the repository.
Everything fetched is verified (AEAD tag, keyed MAC, size) as ``restore``
verifies it; a damaged object makes the read fail with EIO and a warning.

The backup list is read at mount time and again, at most every
``REFRESH_SECONDS``, when the top directories are listed.

The file system class is plain Python (mfusepy calls whatever operations it
defines); ``run_mount`` imports the FUSE binding, so everything else in the
client works on machines without FUSE.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pysrbup.client.browse import st_mode
from pysrbup.client.repository import FETCH_IDS, RemoteRepository
from pysrbup.errors import IntegrityError, PysrbupError, UsageError
from pysrbup.proto import repo_pb2, service_pb2
from pysrbup.repo import tree

#: Plaintext bytes of file chunks kept for reuse (and read ahead into).
CHUNK_CACHE_BYTES = 32 * 1024 * 1024
#: Estimated bytes of parsed directories kept (measured: about six times their plaintext,
#: some 540 bytes per entry).
TREE_CACHE_BYTES = 32 * 1024 * 1024
#: Bytes of a file fetched ahead of a sequential reader.
READAHEAD_BYTES = 8 * 1024 * 1024
#: Subdirectory trees fetched ahead, in one request, when a directory is listed.
PREFETCH_TREES = 256
#: Seconds before listing the top directories asks the server for the backups again.
REFRESH_SECONDS = 30.0

NODE_FILE = repo_pb2.NODE_FILE
NODE_DIR = repo_pb2.NODE_DIR
NODE_SYMLINK = repo_pb2.NODE_SYMLINK

_DIR_MODE = stat.S_IFDIR | 0o555
_LINK_MODE = stat.S_IFLNK | 0o777


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class ObjectCache:
    """Verified objects by id within a byte budget; concurrent requests fetch each id once.

    ``load(oids)`` yields ``(oid, value or None, why not, cost)``; values are
    kept while the sum of their costs stays within ``budget``. Failures are
    remembered (a damaged object stays damaged) so every reader gets the reason.
    """

    def __init__(
        self,
        load: Callable[[list[bytes]], Iterator[tuple[bytes, object | None, str, int]]],
        budget: int,
        pool: ThreadPoolExecutor,
    ):
        self._load_many = load
        self._budget = budget
        self._pool = pool
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._used = 0
        self._inflight: dict[bytes, threading.Event] = {}
        self._failed: dict[bytes, str] = {}
        self.fetched = 0

    def get_many(self, oids: Iterable[bytes]) -> dict[bytes, object]:
        """The values of ``oids``; IntegrityError if one is missing or damaged."""
        wanted = list(dict.fromkeys(oids))
        found: dict[bytes, object] = {}
        waits: list[tuple[bytes, threading.Event]] = []
        with self._lock:
            mine = self._claim(wanted, found, waits)
        if mine:
            found.update(self._fetch(mine))
        for oid, event in waits:
            if oid in found:
                continue
            event.wait()
            with self._lock:
                hit = self._cache.get(oid)
                problem = self._failed.get(oid)
            if hit is not None:
                found[oid] = hit[0]
            elif problem is None:  # evicted before we looked: fetch it ourselves
                found.update(self._fetch([oid], claimed=False))
        for oid in wanted:
            if oid not in found:
                raise IntegrityError(self._failed.get(oid) or f"object {oid.hex()[:16]} is missing")
        return found

    def prefetch(self, oids: Iterable[bytes]) -> None:
        """Starts fetching those of ``oids`` not at hand or on their way, in the background."""
        with self._lock:
            busy = self._inflight
            mine = [o for o in dict.fromkeys(oids) if o not in self._cache and o not in busy]
            for oid in mine:
                self._inflight[oid] = threading.Event()
        if mine:
            self._pool.submit(self._fetch_quietly, mine)

    def _claim(self, wanted, found, waits) -> list[bytes]:
        mine = []
        for oid in wanted:
            hit = self._cache.get(oid)
            if hit is not None:
                self._cache.move_to_end(oid)
                found[oid] = hit[0]
                continue
            if oid in self._failed:
                continue
            event = self._inflight.get(oid)
            if event is None:
                event = self._inflight[oid] = threading.Event()
                mine.append(oid)
            waits.append((oid, event))
        return mine

    def _fetch_quietly(self, oids: list[bytes]) -> None:
        # A reader that needs them fetches them again and reports why it failed.
        with contextlib.suppress(Exception):
            self._fetch(oids)

    def _fetch(self, oids: list[bytes], claimed: bool = True) -> dict[bytes, object]:
        got: dict[bytes, object] = {}
        try:
            for start in range(0, len(oids), FETCH_IDS):
                for oid, value, problem, cost in self._load_many(oids[start : start + FETCH_IDS]):
                    with self._lock:
                        self.fetched += 1
                        if value is None:
                            if len(self._failed) > 4096:
                                self._failed.clear()
                            self._failed[oid] = problem
                        else:
                            got[oid] = value
                            self._keep(oid, value, cost)
                        if claimed:
                            event = self._inflight.pop(oid, None)
                            if event is not None:
                                event.set()
        finally:
            if claimed:
                with self._lock:  # not sent, or the fetch failed: let waiters try themselves
                    for oid in oids:
                        event = self._inflight.pop(oid, None)
                        if event is not None:
                            event.set()
        return got

    def _keep(self, oid: bytes, value: object, cost: int) -> None:
        if cost > self._budget or oid in self._cache:
            return
        self._cache[oid] = (value, cost)
        self._used += cost
        while self._used > self._budget:
            _, (_, old) = self._cache.popitem(last=False)
            self._used -= old


@dataclass
class _Backup:
    info: service_pb2.SnapshotInfo
    record: repo_pb2.Snapshot
    name: str  # under snapshots/


@dataclass
class _OpenFile:
    node: repo_pb2.Node
    ids: list[bytes]
    offsets: list[int]
    sizes: list[int]
    where: str
    next_offset: int = 0


def _times(ns: int) -> dict[str, int]:
    return {"st_mtime": ns, "st_ctime": ns, "st_atime": ns}


def _time_name(ns: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ns / 1e9).astimezone()
    return stamp.isoformat(timespec="seconds")


class BackupFS:
    """The FUSE operations (mfusepy's interface) over one repository, read-only."""

    use_ns = True  # times in nanoseconds, as the trees store them

    def __init__(
        self,
        repo: RemoteRepository,
        warn: Callable[[str], None],
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
        tree_cache_bytes: int = TREE_CACHE_BYTES,
    ):
        self.repo = repo
        self._warn = warn
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pysrbup-mount")
        self.trees = ObjectCache(self._load_trees, tree_cache_bytes, self._pool)
        self.chunks = ObjectCache(self._load_chunks, chunk_cache_bytes, self._pool)
        self._lock = threading.Lock()
        self._backups: dict[str, _Backup] = {}
        self._by_name: dict[str, str] = {}
        self._latest: str | None = None
        self._listed_at = 0.0
        self._roots: dict[str, repo_pb2.Node] = {}
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._warned: set[str] = set()
        self._mounted_at = time.time_ns()
        self.served = False  # set once the kernel has mounted the file system
        self.refresh(force=True)

    # ---- the backup list ----------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Reads the backup list again if it is older than ``REFRESH_SECONDS``."""
        if not force and time.monotonic() - self._listed_at < REFRESH_SECONDS:
            return
        infos = self.repo.snapshots()
        backups = {}
        for info in infos:
            old = self._backups.get(info.snapshot_id)
            record = old.record if old else self.repo.open_snapshot(info)
            backups[info.snapshot_id] = _Backup(info, record, "")
        names: dict[str, str] = {}
        ordered = sorted(backups.values(), key=lambda b: (b.record.time_ns, b.info.snapshot_id))
        for backup in ordered:
            base = name = _time_name(backup.record.time_ns)
            suffix = 1
            while name in names:
                name = f"{base}-{suffix}"
                suffix += 1
            backup.name = name
            names[name] = backup.info.snapshot_id
        with self._lock:
            self._backups = backups
            self._by_name = names
            self._latest = ordered[-1].info.snapshot_id if ordered else None
            self._listed_at = time.monotonic()

    # ---- fetching -----------------------------------------------------------------

    def _load_trees(self, oids: list[bytes]):
        for oid, plain, problem in self.repo.fetch_objects(oids):
            if plain is None:
                yield oid, None, problem, 0
                continue
            try:
                parsed = tree.parse(plain, f"tree {oid.hex()[:16]}")
            except IntegrityError as exc:
                yield oid, None, str(exc), 0
                continue
            entries = {node.name: node for node in parsed.nodes}
            yield oid, entries, "", 6 * len(plain) + 256

    def _load_chunks(self, oids: list[bytes]):
        for oid, plain, problem in self.repo.fetch_objects(oids):
            yield oid, plain, problem, 0 if plain is None else len(plain) + 64

    def _entries(self, node: repo_pb2.Node) -> dict[bytes, repo_pb2.Node]:
        return self.trees.get_many([node.subtree])[node.subtree]  # type: ignore[return-value]

    def _root(self, backup_id: str) -> repo_pb2.Node:
        root = self._roots.get(backup_id)
        if root is None:
            record = self._backups[backup_id].record
            nodes = list(self.trees.get_many([record.root_tree])[record.root_tree].values())
            if len(nodes) != 1 or nodes[0].type != NODE_DIR:
                raise IntegrityError(
                    f"backup {backup_id}: the root tree does not hold exactly one directory"
                )
            root = self._roots[backup_id] = nodes[0]
        return root

    # ---- paths --------------------------------------------------------------------

    def _resolve(self, path: str):
        """What ``path`` is: ("dir", None) for the top, ("link", target), or ("node", node)."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "dir", None
        top = parts[0]
        if top == "snapshots":
            if len(parts) == 1:
                return "dir", None
            if len(parts) > 2:
                raise _fail(errno.ENOENT)
            if parts[1] == "latest" and self._latest and "latest" not in self._by_name:
                return "link", f"../ids/{self._latest}"
            backup_id = self._by_name.get(parts[1])
            if backup_id is None:
                raise _fail(errno.ENOENT)
            return "link", f"../ids/{backup_id}"
        if top != "ids":
            raise _fail(errno.ENOENT)
        if len(parts) == 1:
            return "dir", None
        backup_id = parts[1]
        if backup_id not in self._backups:
            raise _fail(errno.ENOENT)
        node = self._root(backup_id)
        for part in parts[2:]:
            if node.type != NODE_DIR:
                raise _fail(errno.ENOTDIR)
            child = self._entries(node).get(os.fsencode(part))
            if child is None:
                raise _fail(errno.ENOENT)
            node = child
        return "node", node

    def _guard(self, path: str, action: Callable):
        """Runs ``action``; a repository problem becomes EIO with one warning per path."""
        try:
            return action()
        except OSError:
            raise
        except PysrbupError as exc:
            key = f"{path}: {exc}"
            if key not in self._warned:
                self._warned.add(key)
                self._warn(key)
            raise _fail(errno.EIO) from None

    # ---- FUSE operations ----------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict:
        kind, value = self._guard(path, lambda: self._resolve(path))
        if kind == "dir":
            return {"st_mode": _DIR_MODE, "st_nlink": 1, **_times(self._mounted_at)}
        if kind == "link":
            times = _times(self._mounted_at)
            return {"st_mode": _LINK_MODE, "st_nlink": 1, "st_size": len(value), **times}
        node = value
        size = node.size if node.type == NODE_FILE else len(node.link_target)
        return {
            "st_mode": st_mode(node),
            "st_nlink": 1 if node.type == NODE_DIR else max(node.links, 1),
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_rdev": node.rdev,
            **_times(node.mtime_ns),
        }

    def readdir(self, path: str, fh: int) -> list:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return [".", "..", "ids", "snapshots"]
        if len(parts) == 1:
            if parts[0] not in ("ids", "snapshots"):
                raise _fail(errno.ENOENT)
            self._guard(path, self.refresh)
            if parts[0] == "ids":
                return [".", "..", *self._backups]
            names = list(self._by_name)
            if self._latest and "latest" not in self._by_name:
                names.append("latest")
            return [".", "..", *names]
        kind, node = self._guard(path, lambda: self._resolve(path))
        if kind != "node" or node.type != NODE_DIR:
            raise _fail(errno.ENOTDIR)
        entries = self._guard(path, lambda: self._entries(node))
        self.trees.prefetch(
            [child.subtree for child in entries.values() if child.type == NODE_DIR][:PREFETCH_TREES]
        )
        return [".", "..", *(os.fsdecode(name) for name in entries)]

    def readlink(self, path: str) -> str:
        kind, value = self._guard(path, lambda: self._resolve(path))
        if kind == "link":
            return value
        if kind != "node" or value.type != NODE_SYMLINK:
            raise _fail(errno.EINVAL)
        return os.fsdecode(value.link_target)

    def open(self, path: str, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _fail(errno.EROFS)
        kind, node = self._guard(path, lambda: self._resolve(path))
        if kind != "node":
            raise _fail(errno.EISDIR if kind == "dir" else errno.ELOOP)
        if node.type == NODE_DIR:
            raise _fail(errno.EISDIR)
        if node.type != NODE_FILE:
            raise _fail(errno.EACCES)
        chunks = self._guard(path, lambda: tree.file_chunks(node, path))
        handle = _OpenFile(
            node,
            [oid for oid, _, _ in chunks],
            [offset for _, offset, _ in chunks],
            [size for _, _, size in chunks],
            path,
        )
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = handle
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        end = min(offset + size, handle.node.size)
        if offset >= end:
            return b""
        first = bisect.bisect_right(handle.offsets, offset) - 1
        stop = bisect.bisect_left(handle.offsets, end)
        if offset == handle.next_offset:  # sequential: keep READAHEAD_BYTES on their way
            ahead, total = stop, 0
            while ahead < len(handle.ids) and total < READAHEAD_BYTES:
                total += handle.sizes[ahead]
                ahead += 1
            self.chunks.prefetch(handle.ids[stop:ahead])
        handle.next_offset = end
        return self._guard(path, lambda: self._bytes(handle, first, stop, offset, end))

    def _bytes(self, handle: _OpenFile, first: int, stop: int, offset: int, end: int) -> bytes:
        """Bytes ``offset:end`` of the file, from its chunks ``first:stop`` (verified)."""
        got = self.chunks.get_many(handle.ids[first:stop])
        out = []
        for index in range(first, stop):
            data = got[handle.ids[index]]
            if len(data) != handle.sizes[index]:  # type: ignore[arg-type]
                raise IntegrityError(f"chunk {handle.ids[index].hex()[:16]} has the wrong size")
            start = handle.offsets[index]
            out.append(data[max(offset - start, 0) : end - start])  # type: ignore[index]
        return out[0] if len(out) == 1 else b"".join(out)

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._files.pop(fh, None)
        return 0

    def listxattr(self, path: str) -> list[str]:
        kind, node = self._guard(path, lambda: self._resolve(path))
        if kind != "node":
            return []
        return [os.fsdecode(x.name) for x in node.xattrs]

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        kind, node = self._guard(path, lambda: self._resolve(path))
        if kind == "node":
            wanted = os.fsencode(name)
            for x in node.xattrs:
                if x.name == wanted:
                    return x.value
        raise _fail(errno.ENODATA)

    def init(self, path: str) -> None:
        self.served = True

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def destroy(self, path: str) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_mount(
    repo: RemoteRepository,
    mountpoint: str,
    warn: Callable[[str], None],
    allow_other: bool = False,
    default_permissions: bool = True,
    announce: Callable[[str], None] = print,
) -> None:
    """Mounts the repository at ``mountpoint`` and serves it until it is unmounted.

    Returns when the file system is unmounted (``fusermount -u``, ``umount``)
    or the process gets SIGINT, SIGTERM or SIGHUP (libfuse then unmounts).
    """
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: the mount point is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("mount needs FUSE, and this machine has no /dev/fuse")
    try:
        import mfusepy
    except (ImportError, OSError) as exc:
        raise UsageError(
            f"mount needs the FUSE library (libfuse3; Debian: apt-get install fuse3): {exc}"
        ) from None
    fs = BackupFS(repo, warn)
    options = {
        "foreground": True,
        "ro": True,
        "fsname": "pysrbup",
        "subtype": "pysrbup",
        "kernel_cache": True,  # backups never change: the kernel may keep what it read
        "default_permissions": default_permissions,
        "allow_other": allow_other,
        "max_idle_threads": 8,  # set: libfuse 3.14 warns about its own unset default
    }
    announce(
        f"serving {len(fs._backups)} backup(s) at {mountpoint}; "
        f"Ctrl-C or 'fusermount -u {mountpoint}' unmounts"
    )
    try:
        mfusepy.FUSE(fs, mountpoint, **options)
    except RuntimeError as exc:
        # libfuse's loop also ends with an error when a signal (Ctrl-C) unmounts it.
        if not fs.served:
            raise UsageError(f"could not mount at {mountpoint} (libfuse error {exc})") from None
    finally:
        fs.destroy("/")
