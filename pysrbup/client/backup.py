"""Backing up a directory tree: a pipeline of threads that keeps every core busy.

::

    walker (main thread)   lstat, files cache ──hit──▶ node from the cache
          │ miss                                       (ids still in the synced id set)
          ▼
    file workers xN        readinto pooled blocks ─▶ CDC cut points (native, no GIL)
                           ─▶ keyed BLAKE3 id (no GIL) ─▶ known? ─yes─▶ just the id
          │ new chunk (a view into the block: no copy)
          ▼
    seal workers xN        zstd (no GIL; skipped when a sample does not shrink)
                           ─▶ AES-256-GCM ─▶ uploader.put (framed, one copy)
          ▼
    uploader thread        raw-bytes stream; acks as frames become durable
                           ─▶ files cache entries whose chunks are now all durable

Threads, not processes, because the heavy stages release the GIL (measured
here: the chunker, blake3, zstandard and file reads); AES-GCM holds it but
runs at ~9 GB/s, and processes would cost a copy of every chunk between them.
Small files (one read) are handled start to end by their file worker; larger
files hand each new chunk to the seal pool as a view into a pooled block, so
one big file still keeps both cores busy. Blocks are reused (no page faults
per chunk) and the pool bounds memory.

Directories complete asynchronously: each keeps a count of unfinished
entries, and whichever thread finishes the last one stores the directory's
``Tree`` object and reports to its parent. The snapshot record is committed
only after the uploader has every object acknowledged as durable.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import queue
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from pysrbup._native import chunker
from pysrbup.client.excludes import Excludes
from pysrbup.client.filescache import FilesCache
from pysrbup.client.idcache import IdCache
from pysrbup.client.progress import Progress
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.retry import retrying
from pysrbup.client.session import SessionHolder
from pysrbup.client.uploader import Uploader
from pysrbup.errors import IntegrityError, NotFoundError, UsageError
from pysrbup.memtune import tune_malloc
from pysrbup.proto import repo_pb2
from pysrbup.repo import envelope, snapshot, tree
from pysrbup.repo.wire import ID_SIZE
from pysrbup.textsafe import printable

SNAPSHOT_VERSION = 1
#: Read size of the block pipeline; a block also holds the carried tail (< max chunk).
READ_BYTES = 4 * 1024 * 1024
BLOCK_BYTES = READ_BYTES + chunker.DEFAULT_MAX
#: Files up to this size are read in one go and sealed by their file worker.
SMALL_FILE = 1024 * 1024
#: Incompressibility check: this many 1 KiB slices, spread over the chunk, are
#: compressed first (~30 µs); zstd runs on the chunk only if they shrink.
SAMPLE_SLICES = 32
SAMPLE_SLICE = 1024
SAMPLE_RATIO = 0.99
#: Zeros to fill the holes of sparse files with (one block's worth, shared).
_ZEROS = memoryview(bytes(BLOCK_BYTES))
FILE_QUEUE = 256


@dataclass
class BackupResult:
    """What a finished backup reports."""

    backup_id: str = ""
    files: int = 0
    dirs: int = 0
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_sent: int = 0
    chunks_new: int = 0
    files_cached: int = 0
    bytes_hashed: int = 0
    retries: int = 0
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "backup_id": self.backup_id,
            "files": self.files,
            "dirs": self.dirs,
            "bytes_read": self.bytes_read,
            "bytes_new": self.bytes_new,
            "bytes_sent": self.bytes_sent,
            "chunks_new": self.chunks_new,
            "files_cached": self.files_cached,
            "bytes_hashed": self.bytes_hashed,
            "retries": self.retries,
            "duration": round(self.duration, 3),
            "errors": len(self.errors),
        }


def _owner_names(st: os.stat_result) -> tuple[str, str]:
    try:
        import grp
        import pwd

        user = pwd.getpwuid(st.st_uid).pw_name
    except (KeyError, ImportError):
        user = ""
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, NameError):
        group = ""
    return user, group


def _base_node(name: bytes, st: os.stat_result, kind: int) -> repo_pb2.Node:
    return repo_pb2.Node(
        name=name,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
    )


class _Block:
    """A reusable read buffer; chunks in flight hold references to it."""

    __slots__ = ("buf", "pool", "refs", "view")

    def __init__(self, pool: queue.LifoQueue):
        self.buf = bytearray(BLOCK_BYTES)
        self.view = memoryview(self.buf)
        self.pool = pool
        self.refs = 0

    def release(self, lock: threading.Lock) -> None:
        with lock:
            self.refs -= 1
            free = self.refs == 0
        if free:
            self.pool.put(self)


class _SparseReader:
    """``readinto`` over a file with holes: data is read, holes are zero-filled.

    SEEK_DATA/SEEK_HOLE say where the data is; a hole costs no read and no
    page of the page cache. The bytes are the same as a plain read's, so the
    chunks (and their ids) are the same as for a dense copy of the file.
    """

    def __init__(self, handle):
        self.handle = handle
        self.fd = handle.fileno()
        self.end = os.fstat(self.fd).st_size

    def readinto(self, view: memoryview) -> int:
        pos = self.handle.tell()
        if pos >= self.end:
            return 0
        try:
            data = os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left up to the end
            data = self.end
        if data > pos:  # a hole: zeros, without reading them
            count = min(data - pos, len(view))
            view[:count] = _ZEROS[:count]
            self.handle.seek(pos + count)
            return count
        hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
        self.handle.seek(pos)
        return self.handle.readinto(view[: min(hole - pos, len(view))])


class _Dir:
    """A directory whose entries are still being saved."""

    __slots__ = ("index", "lock", "node", "nodes", "parent", "remaining")

    def __init__(self, node: repo_pb2.Node, parent: _Dir | None, index: int):
        self.node = node
        self.parent = parent
        self.index = index
        self.nodes: list[repo_pb2.Node | None] = []
        self.remaining = 1  # released once every entry has been dispatched
        self.lock = threading.Lock()


@dataclass
class _FileJob:
    path: str
    path_b: bytes
    st: os.stat_result
    node: repo_pb2.Node
    parent: _Dir
    index: int
    now_ns: int


class _PendingEntry:
    """A files-cache entry waiting for its chunks to become durable."""

    __slots__ = ("ids", "now_ns", "path", "sizes", "st", "waiting")

    def __init__(self, path: bytes, st, ids: bytes, sizes: bytes, now_ns: int):
        self.path, self.st, self.ids, self.sizes, self.now_ns = path, st, ids, sizes, now_ns
        self.waiting = 0


class Backup:
    """One backup run against an open remote repository."""

    def __init__(
        self,
        repo: RemoteRepository,
        num_threads: int = 2,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
        excludes: Excludes | None = None,
        xattrs: bool = True,
        dry_run: bool = False,
    ):
        tune_malloc()
        self.repo = repo
        self.dry_run = dry_run
        self._excludes = excludes or Excludes()
        self._read_xattrs = xattrs
        self._root_dev = -1
        self.key = repo._require_key()
        self.num_threads = max(1, num_threads)
        self.progress = progress or Progress("backup", enabled=False)
        self.warn = warn or (
            lambda message: print(f"warning: {printable(message)}", file=sys.stderr)
        )
        self.result = BackupResult()
        self._known: set[bytes] = set()
        self._claimed: set[bytes] = set()
        # Every id this backup references (uploaded or deduplicated): before the
        # commit, any of them condemned by a concurrent delete is revived.
        self._used: set[bytes] = set()
        # Claimed by this session, not yet acknowledged durable -> entries waiting on it.
        self._not_durable: dict[bytes, list[_PendingEntry]] = {}
        self._lock = threading.Lock()
        self._gear = chunker.gear_table(self.key.gear_seed)
        self._sizes = (chunker.DEFAULT_MIN, chunker.DEFAULT_AVG, chunker.DEFAULT_MAX)
        self._names: dict[tuple[int, int], tuple[str, str]] = {}
        self._local = threading.local()
        self._fatal: BaseException | None = None
        self._root_done = threading.Event()
        self._root_node: repo_pb2.Node | None = None
        self._files: FilesCache | None = None

    # ---- objects -------------------------------------------------------

    def _sampler(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "sampler", None)
        if comp is None:
            comp = self._local.sampler = zstandard.ZstdCompressor(level=1)
        return comp

    def _compressible(self, data) -> bool:
        """Whether zstd is worth running: compresses ``SAMPLE_SLICES`` small slices first."""
        size = len(data)
        if size < 4 * SAMPLE_SLICES * SAMPLE_SLICE:
            return True
        step = (size - SAMPLE_SLICE) // (SAMPLE_SLICES - 1)
        sample = b"".join(data[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES))
        return len(self._sampler().compress(sample)) < SAMPLE_RATIO * len(sample)

    def _claim(self, oid: bytes) -> bool:
        """True if this backup must upload ``oid`` (neither stored nor claimed already)."""
        with self._lock:
            self._used.add(oid)
            if oid in self._known or oid in self._claimed:
                return False
            self._claimed.add(oid)
            self._not_durable[oid] = []
            return True

    def _seal_and_put(self, oid: bytes, data) -> None:
        if not self.dry_run:
            sealed = self._sealer.seal(oid, data, compress=self._compressible(data))
            self._uploader.put(oid, sealed)
        with self._lock:
            self.result.bytes_new += len(data)
            self.result.chunks_new += 1

    def _store(self, data) -> bytes:
        """Names ``data`` and uploads it unless the repository already has it."""
        oid = self._sealer.object_id(data)
        if self._claim(oid):
            self._seal_and_put(oid, data)
        return oid

    def _seal_job(self, oid: bytes, data, block: _Block) -> None:
        try:
            self._seal_and_put(oid, data)
        except BaseException as exc:
            self._fail(exc)
        finally:
            del data
            block.release(self._lock)

    # ---- durability and the files cache ---------------------------------

    def _on_durable(self, oids: list[bytes]) -> None:
        """Uploader callback: these objects are stored; record files now complete."""
        ready = []
        with self._lock:
            for oid in oids:
                for entry in self._not_durable.pop(oid, ()):
                    entry.waiting -= 1
                    if entry.waiting == 0:
                        ready.append(entry)
        files = self._files
        if files is not None:
            for entry in ready:
                files.add(entry.path, entry.st, entry.ids, entry.sizes, entry.now_ns)
            files.flush()

    def _record_file(self, job: _FileJob, ids: bytes, sizes: bytes, size: int) -> None:
        if self._files is None or size != job.st.st_size:
            return
        entry = _PendingEntry(job.path_b, job.st, ids, sizes, job.now_ns)
        with self._lock:
            for i in range(0, len(ids), ID_SIZE):
                waiters = self._not_durable.get(ids[i : i + ID_SIZE])
                if waiters is not None:
                    waiters.append(entry)
                    entry.waiting += 1
        if entry.waiting == 0:
            self._files.add(entry.path, entry.st, entry.ids, entry.sizes, entry.now_ns)

    def _cached_node(self, path_b: bytes, st: os.stat_result, node: repo_pb2.Node) -> bool:
        files = self._files
        entry = files.lookup(path_b, st) if files is not None else None
        if entry is None:
            return False
        ids = entry.chunk_ids
        oids = [ids[i : i + ID_SIZE] for i in range(0, len(ids), ID_SIZE)]
        known = self._known
        if not all(oid in known for oid in oids):
            return False  # collected by a delete since: read the file again
        with self._lock:
            self._used.update(oids)
            self.result.files_cached += 1
        files.keep(path_b)
        node.size = entry.size
        node.chunk_ids = ids
        node.chunk_sizes = entry.chunk_sizes
        return True

    # ---- file workers -----------------------------------------------------

    def _small_buffer(self) -> memoryview:
        view = getattr(self._local, "small", None)
        if view is None:
            view = self._local.small = memoryview(bytearray(SMALL_FILE + 1))
        return view

    def _read_small(self, handle, job: _FileJob, ids: list[bytes], sizes: list[int]) -> int:
        view = self._small_buffer()
        filled = 0
        while filled < len(view):
            got = handle.readinto(view[filled:])
            if not got:
                break
            filled += got
        if filled > SMALL_FILE:  # grew since lstat: take the streaming path
            return -1
        data = view[:filled]
        cuts = chunker.cut_points(self._gear, data, *self._sizes, True) if filled else []
        start = 0
        object_id = self._sealer.object_id
        for cut in cuts:
            chunk = data[start:cut]
            oid = object_id(chunk)
            if self._claim(oid):
                self._seal_and_put(oid, chunk)
            ids.append(oid)
            sizes.append(cut - start)
            start = cut
        self.progress.add_bytes(filled)
        return filled

    def _get_block(self) -> _Block:
        """A free block; allocates up to the pool's limit, then waits for one."""
        try:
            block = self._blocks.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self._blocks_made < self._blocks_max
                self._blocks_made += grow
            block = _Block(self._blocks) if grow else self._blocks.get()
        block.refs = 1
        return block

    def _read_blocks(self, handle, ids: list[bytes], sizes: list[int], sparse: bool = False) -> int:
        """Chunks a file block by block; ``sparse``: holes are zero-filled, never read."""
        block = self._get_block()
        filled = total = 0
        eof = False
        object_id = self._sealer.object_id
        readinto = _SparseReader(handle).readinto if sparse else handle.readinto
        try:
            while not eof:
                view = block.view
                while filled < BLOCK_BYTES:
                    got = readinto(view[filled:BLOCK_BYTES])
                    if not got:
                        eof = True
                        break
                    filled += got
                cuts = chunker.cut_points(self._gear, view[:filled], *self._sizes, eof)
                start = 0
                for cut in cuts:
                    chunk = view[start:cut]
                    oid = object_id(chunk)
                    if self._claim(oid):
                        with self._lock:
                            block.refs += 1
                        self._seals.submit(self._seal_job, oid, chunk, block)
                    ids.append(oid)
                    sizes.append(cut - start)
                    start = cut
                total += start
                self.progress.add_bytes(start)
                if self._fatal is not None:
                    raise self._fatal
                if not eof:
                    nxt = self._get_block()
                    tail = filled - start
                    nxt.view[:tail] = view[start:filled]
                    block.release(self._lock)
                    block, filled = nxt, tail
        finally:
            block.release(self._lock)
        return total

    def _save_file(self, job: _FileJob) -> repo_pb2.Node | None:
        try:
            fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
        except PermissionError:  # O_NOATIME needs ownership
            try:
                fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as exc:
                self._error(f"cannot read {job.path}: {exc.strerror}")
                return None
        except OSError as exc:
            self._error(f"cannot read {job.path}: {exc.strerror}")
            return None
        ids: list[bytes] = []
        sizes: list[int] = []
        steady = True
        try:
            with open(fd, "rb", buffering=0) as handle:
                for attempt in range(2):  # a file that changed while read is read once more
                    size = -1
                    ids.clear()
                    sizes.clear()
                    if job.st.st_size <= SMALL_FILE:
                        size = self._read_small(handle, job, ids, sizes)
                    if size < 0:
                        handle.seek(0)
                        ids.clear()
                        sizes.clear()
                        sparse = job.st.st_blocks * 512 < job.st.st_size  # has holes
                        size = self._read_blocks(handle, ids, sizes, sparse)
                    after = os.fstat(handle.fileno())
                    if (after.st_size, after.st_mtime_ns) == (size, job.st.st_mtime_ns):
                        break
                    job.st = after
                    if attempt == 0:
                        handle.seek(0)
                        continue
                    steady = False  # not worth a files cache entry: read it again next time
                    self._error(f"{job.path} changed while it was read; stored as read")
        except OSError as exc:
            self._error(f"error reading {job.path}: {exc.strerror}")
            return None
        node = job.node
        node.size = size
        node.chunk_sizes = tree.pack_sizes(sizes)
        node.chunk_ids = b"".join(ids)
        with self._lock:
            self.result.files += 1
            self.result.bytes_read += size
            self.result.bytes_hashed += size
        self.progress.add_file()
        if steady:
            self._record_file(job, node.chunk_ids, node.chunk_sizes, size)
        return node

    def _file_worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._fatal is None:
                    self._finish_entry(job.parent, job.index, self._save_file(job))
            except BaseException as exc:
                self._fail(exc)

    # ---- directories --------------------------------------------------------

    def _finish_entry(self, parent: _Dir, index: int, node: repo_pb2.Node | None) -> None:
        """Records one finished entry; stores the directory when it was the last one."""
        while True:
            with parent.lock:
                if index >= 0:
                    parent.nodes[index] = node
                parent.remaining -= 1
                if parent.remaining:
                    return
            nodes = [n for n in parent.nodes if n is not None]
            parent.node.subtree = self._store(tree.serialize(nodes))
            with self._lock:
                self.result.dirs += 1
            if parent.parent is None:
                self._root_node = parent.node
                self._root_done.set()
                return
            parent, index, node = parent.parent, parent.index, parent.node

    def _walk(
        self,
        path: str,
        node: repo_pb2.Node,
        parent: _Dir | None,
        index: int,
        descend: bool = True,
    ) -> None:
        state = _Dir(node, parent, index)
        entries = []
        if descend and not self._excludes.contents_excluded(path):
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: os.fsencode(e.name))
            except OSError as exc:
                self._error(f"cannot read directory {path}: {exc.strerror}")
                if parent is None:
                    raise UsageError(f"cannot read directory {path}") from None
        state.nodes = [None] * len(entries)
        state.remaining += len(entries)
        now_ns = time.time_ns()
        for i, entry in enumerate(entries):
            if self._fatal is not None:
                raise self._fatal
            self._dispatch(entry.path, os.fsencode(entry.name), state, i, now_ns)
        self._finish_entry(state, -1, None)

    def _xattrs(self, path: str, node: repo_pb2.Node) -> None:
        """Adds the extended attributes of ``path`` (not followed) to ``node``."""
        if not self._read_xattrs:
            return
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return  # not supported here, or not allowed: nothing to keep
        for attr in sorted(names):
            try:
                value = os.getxattr(path, attr, follow_symlinks=False)
            except OSError:
                continue
            node.xattrs.add(name=os.fsencode(attr), value=value)

    def _dispatch(self, path: str, name: bytes, state: _Dir, index: int, now_ns: int) -> None:
        if self._excludes.excluded(path):
            self._finish_entry(state, index, None)
            return
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._error(f"cannot stat {path}: {exc.strerror}")
            self._finish_entry(state, index, None)
            return
        mode = st.st_mode
        if stat.S_ISREG(mode) and self._excludes.too_large(st.st_size):
            self._finish_entry(state, index, None)
            return
        if stat.S_ISREG(mode):
            node = _base_node(name, st, repo_pb2.NODE_FILE)
            node.user, node.group = self._owner(st)
            if st.st_nlink > 1:  # restored as hard links to one another
                node.device, node.inode, node.links = st.st_dev, st.st_ino, st.st_nlink
            self._xattrs(path, node)
            path_b = os.fsencode(path)
            if self._cached_node(path_b, st, node):
                with self._lock:
                    self.result.files += 1
                    self.result.bytes_read += node.size
                self.progress.add_bytes(node.size)
                self.progress.add_file()
                self._finish_entry(state, index, node)
                return
            self._jobs.put(_FileJob(path, path_b, st, node, state, index, now_ns))
        elif stat.S_ISDIR(mode):
            node = _base_node(name, st, repo_pb2.NODE_DIR)
            node.user, node.group = self._owner(st)
            self._xattrs(path, node)
            other_fs = self._excludes.one_file_system and st.st_dev != self._root_dev
            self._walk(path, node, state, index, descend=not other_fs)
        elif stat.S_ISLNK(mode):
            node = _base_node(name, st, repo_pb2.NODE_SYMLINK)
            node.user, node.group = self._owner(st)
            self._xattrs(path, node)
            try:
                node.link_target = os.fsencode(os.readlink(path))
            except OSError as exc:
                self._error(f"cannot read link {path}: {exc.strerror}")
                node = None
            self._finish_entry(state, index, node)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = (
                repo_pb2.NODE_FIFO
                if stat.S_ISFIFO(mode)
                else repo_pb2.NODE_CHARDEV
                if stat.S_ISCHR(mode)
                else repo_pb2.NODE_BLOCKDEV
            )
            node = _base_node(name, st, kind)
            node.user, node.group = self._owner(st)
            node.rdev = st.st_rdev if kind != repo_pb2.NODE_FIFO else 0
            self._xattrs(path, node)
            self._finish_entry(state, index, node)
        else:
            self.warn(f"skipping socket {path}")
            self._finish_entry(state, index, None)

    def _owner(self, st: os.stat_result) -> tuple[str, str]:
        key = (st.st_uid, st.st_gid)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = _owner_names(st)
        return names

    def _error(self, message: str) -> None:
        with self._lock:
            self.result.errors.append(message)
        self.warn(message)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = exc
        self._root_done.set()

    # ---- the run -------------------------------------------------------

    def _count_total(self, source: str) -> None:
        total = 0
        for root, _dirs, files in os.walk(source):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        self.progress.set_total(total)

    def _start_block_pool(self) -> None:
        self._blocks: queue.LifoQueue = queue.LifoQueue()
        self._blocks_made = 0
        # Two blocks per file worker keep reading ahead; a fifth measured no faster
        # and cost 8 MiB of peak RSS.
        self._blocks_max = 2 * self.num_threads

    def _run_pipeline(self, source: str, st: os.stat_result) -> repo_pb2.Node:
        threads = self.num_threads
        self._start_block_pool()
        self._jobs: queue.Queue = queue.Queue(maxsize=FILE_QUEUE)
        workers = [
            threading.Thread(target=self._file_worker, name=f"pysrbup-file-{i}", daemon=True)
            for i in range(threads)
        ]
        with ThreadPoolExecutor(threads, thread_name_prefix="pysrbup-seal") as seals:
            self._seals = seals
            for worker in workers:
                worker.start()
            try:
                root = _base_node(
                    os.fsencode(os.path.basename(source) or "root"), st, repo_pb2.NODE_DIR
                )
                root.user, root.group = self._owner(st)
                self._root_dev = st.st_dev
                self._xattrs(source, root)
                self._walk(source, root, None, -1)
            except BaseException as exc:
                self._fail(exc)
            finally:
                for _ in workers:
                    self._jobs.put(None)
                for worker in workers:
                    worker.join()
        if self._fatal is not None:
            raise self._fatal
        self._root_done.wait()
        if self._fatal is not None:
            raise self._fatal
        assert self._root_node is not None
        return self._root_node

    def run(
        self,
        source: str,
        tags: list[str] | None = None,
        host: str | None = None,
        time_ns: int | None = None,
    ) -> BackupResult:
        """Backs up the directory ``source`` and returns the result with its id.

        ``tags``, ``host`` and ``time_ns`` go into the snapshot record (restic's
        ``--tag``, ``--host``, ``--time``); host and time default to this machine and now.
        """
        source = os.path.abspath(source)
        try:
            st = os.stat(source)
        except OSError as exc:
            raise UsageError(f"cannot back up {source}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{source} is not a directory")
        threading.Thread(target=self._count_total, args=(source,), daemon=True).start()
        return self._run(
            os.fsencode(source), lambda: self._run_pipeline(source, st), tags, host, time_ns
        )

    def run_stream(
        self,
        stream,
        name: str,
        tags: list[str] | None = None,
        host: str | None = None,
        time_ns: int | None = None,
    ) -> BackupResult:
        """Backs up what ``stream`` yields (e.g. stdin) as one file called ``name``.

        The snapshot's path is ``/name`` and its root holds just that file, as
        restic's ``backup --stdin --stdin-filename`` does.
        """
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"invalid --stdin-filename {name!r}: one file name, no slashes")
        return self._run(
            os.fsencode("/" + name), lambda: self._stream_node(stream, name), tags, host, time_ns
        )

    def _stream_node(self, stream, name: str) -> repo_pb2.Node:
        """The file node of everything read from ``stream``, chunked like any big file."""
        now = time.time_ns()
        node = repo_pb2.Node(
            name=os.fsencode(name),
            type=repo_pb2.NODE_FILE,
            mode=0o600,
            uid=os.getuid(),
            gid=os.getgid(),
            mtime_ns=now,
        )
        self._start_block_pool()
        ids: list[bytes] = []
        sizes: list[int] = []
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="pysrbup-seal") as seals:
            self._seals = seals
            size = self._read_blocks(stream, ids, sizes)
        if self._fatal is not None:
            raise self._fatal
        node.size = size
        node.chunk_ids = b"".join(ids)
        node.chunk_sizes = tree.pack_sizes(sizes)
        self.result.files = 1
        self.result.bytes_read = self.result.bytes_hashed = size
        return node

    def _run(self, source_b: bytes, make_root, tags, host, time_ns) -> BackupResult:
        """A backup session around ``make_root()`` (the root node), committed as a snapshot."""
        started = time.monotonic()
        repo = self.repo
        if self.dry_run:
            return self._dry_run(make_root, started)
        repo.ensure_initialised()
        cache = IdCache(repo.repo_id)
        # The session begins before the id sync: a delete condemning ids after
        # this point cannot sweep them until the session ends.
        self._sessions = SessionHolder(repo.begin_session)
        cache.sync(repo.conn)
        self._known = cache.ids
        self._sealer = repo.new_session_sealer(self._sessions.current)
        self._files = FilesCache(repo.repo_id).open()
        self._uploader = Uploader(
            repo.conn, self._sessions, on_durable=self._on_durable, warn=self.warn
        )
        try:
            root = make_root()
            root_tree = self._store(tree.serialize([root]))
            stats = self._uploader.finish()
            self.result.bytes_sent = stats.bytes_sent
            self.result.retries = stats.retries
            when = time.time_ns() if time_ns is None else time_ns
            record = repo_pb2.Snapshot(
                version=SNAPSHOT_VERSION,
                time_ns=when,
                utc_offset_s=snapshot.utc_offset(when),
                tags=snapshot.normal_tags(tags or []),
                hostname=socket.gethostname() if host is None else host,
                username=getpass.getuser(),
                source_path=source_b,
                root_tree=root_tree,
                files=self.result.files,
                dirs=self.result.dirs,
                logical_bytes=self.result.bytes_read,
                bytes_new=self.result.bytes_new,
                bytes_sent=self.result.bytes_sent,
                session_key_id=self._sealer.key_id,
            )
            backup_id, sealed = snapshot.seal_snapshot(self._sealer, record)
            self._confirm_deduplicated(cache)
            self._commit(cache, backup_id, sealed)
            self._files.compact(source_b)
        except BaseException:
            self._abort()
            raise
        finally:
            self._files.close()
            self.progress.close()
        self.result.backup_id = backup_id
        self.result.duration = time.monotonic() - started
        return self.result

    def _dry_run(self, make_root, started: float) -> BackupResult:
        """Reads, chunks and names everything, counts what is new, and uploads nothing.

        Nothing is written anywhere: no session, no record, no files cache entry.
        """
        repo = self.repo
        cache = IdCache(repo.repo_id)
        if repo.initialised:
            cache.sync(repo.conn)  # reading the public id log changes nothing
        self._known = cache.ids
        # Ids need only the MAC key; a throwaway sealer key never leaves this process.
        self._sealer = envelope.Sealer(self.key.mac_key, os.urandom(32), os.urandom(16))
        self._files = FilesCache(repo.repo_id).open(read_only=True)
        try:
            root = make_root()
            self._store(tree.serialize([root]))
            if self._fatal is not None:
                raise self._fatal
        finally:
            self._files.close()
            self.progress.close()
        self.result.duration = time.monotonic() - started
        return self.result

    def _confirm_deduplicated(self, cache: IdCache) -> None:
        """Checks that the repository holds what this backup reused instead of uploading.

        The id log only says what the server claims; one batched existence
        query (32 bytes per id) confirms it before the snapshot can depend on
        it. Ids it lacks are dropped from the local cache so the next run
        uploads them.
        """
        with self._lock:
            reused = [oid for oid in self._used if oid not in self._claimed]
        missing = self.repo.missing_objects(reused)
        if missing:
            cache.discard(missing)
            raise IntegrityError(
                f"the repository lacks {len(missing)} object(s) its id log lists and this "
                "backup reuses; they are forgotten locally: run the backup again to upload them"
            )

    def _commit(self, cache: IdCache, backup_id: str, sealed: bytes) -> None:
        """Commits the snapshot, riding out a server restart or a lost connection."""
        sessions = self._sessions
        attempted = []

        def attempt() -> None:
            attempted.append(sessions.current)
            self.repo.commit_backup(cache, sessions.current, backup_id, sealed, self._used)

        def renew(exc: Exception) -> None:
            if isinstance(exc, NotFoundError):  # the server forgot the session
                sessions.renew(attempted[-1])

        retrying(attempt, self.warn, "the commit", on_transient=renew)

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self._uploader.abort()
        sessions = getattr(self, "_sessions", None)
        if sessions is not None:
            with contextlib.suppress(Exception):
                self.repo.end_session(sessions.current)
