"""The worker processes of a backup: each scans directories and saves their files.

The main process hands out directories (``("dir", job, path, descend)``); a
worker lists one, ``lstat``s each entry, builds its node, and for a regular
file either takes it from the files cache or reads, chunks, names, compresses
and encrypts it (``FileSaver``). New sealed chunks are written into shared
memory arenas the worker owns (anonymous ``MAP_SHARED`` mappings made before
the fork); only small descriptors cross the pipe::

    worker -> main   ("count", job, entries)
                     ("entries", job, done, arena, objects, entries, stats, retired)
                         objects: (oid, offset, length, plaintext bytes) in ``arena``
                         entries: (index, kind, payload), kinds below
                         retired: arenas the worker filled and will not write again
                     ("error", text) ("warn", text) ("starved",) ("fatal", text)
    main -> worker   ("dir", job, path, descend) ("free", arena) ("stop",)

The main process claims each object (another worker may have sent the same
chunk first) and hands the arena bytes to the uploader without copying; a
worker fills an arena across messages, and once it has retired it (full), the
main process frees it when the uploader has framed everything in it. It assembles
the trees and tracks durability; see ``backup.py``.

Everything a worker needs (keys, the synced id set, the files cache, the
exclude rules) is inherited through ``fork``, which happens before the
uploader starts, so no thread of the parent is inside anything a worker uses.
Workers never touch gRPC and leave with ``os._exit``. Within a worker, a
small file is saved start to end by its one thread; the chunks of a large file
are sealed by a few threads (zstd and AES-GCM release the GIL).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import signal
import stat
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pysrbup._native import chunker
from pysrbup.client.excludes import Excludes
from pysrbup.client.file_saver import Block, BlockPool, FileSaver, compressible, open_to_read
from pysrbup.client.filescache import FilesCache, cacheable, record_of
from pysrbup.client.idset import IdSet
from pysrbup.client.ipc import Channel, Child, channel_pair
from pysrbup.client.nodes import NodeMaker
from pysrbup.errors import IntegrityError
from pysrbup.repo import envelope, tree
from pysrbup.repo.wire import ID_SIZE, split_ids

#: Bytes of one arena; the largest sealed chunk fits (the max chunk, uncompressed).
ARENA_BYTES = 2 * (chunker.DEFAULT_MAX + envelope.OVERHEAD)
#: Arenas per worker: one being filled while the others wait to be framed.
ARENAS = 3
#: Entries per message at most (a message also goes when its arena is full).
MESSAGE_ENTRIES = 256
#: Sealed bytes per message at most: the uploader gets a big file's chunks as they
#: come, not an arena at a time (the first frame of a backup went 15 ms later).
MESSAGE_BYTES = 2 * 1024 * 1024
#: Directory jobs outstanding per worker (the rest wait in the main process).
JOBS_AHEAD = 4

SKIP, NODE, FILE, DIR = 0, 1, 2, 3


#: Entries looked at (lstat, files cache, open) ahead of the one being saved.
READ_AHEAD_ENTRIES = 32
#: Bytes of each file to be read asked of the disk that far ahead (the kernel's
#: own readahead takes over for the rest of a big file).
READ_AHEAD_BYTES = 1024 * 1024


@dataclass
class _Looked:
    """One directory entry, looked at ahead of its saving (see ``_Worker._look``)."""

    index: int
    path: str
    name: bytes
    st: os.stat_result | None = None  # None: skipped (excluded, too large, or ``problem``)
    problem: str = ""  # why there is no ``st`` (reported in order, when it is saved)
    path_b: bytes = b""  # ``path`` encoded, for a regular file
    found: tuple | None = None  # the files cache's (place, record) if unchanged
    fd: int | None = None  # open for reading, its first bytes on their way


@dataclass
class WorkerSetup:
    """What every worker inherits: keys, ids, caches and rules."""

    sealer: envelope.Sealer
    gear: object
    known: IdSet
    files: FilesCache | None
    excludes: Excludes
    read_xattrs: bool
    root_dev: int
    dry_run: bool
    seal_threads: int


class _Worker:
    """One worker process's loop (runs after the fork)."""

    def __init__(self, conn: Channel, setup: WorkerSetup, arenas: list[mmap.mmap]):
        self.conn = conn
        self.setup = setup
        self.arenas = [memoryview(a) for a in arenas]
        self.free = list(range(len(arenas)))
        self.queued: deque = deque()
        self.lock = threading.RLock()
        self.claimed: set[bytes] = set()
        self.nodes = NodeMaker(setup.read_xattrs)
        self.pool = ThreadPoolExecutor(setup.seal_threads, thread_name_prefix="pysrbup-seal")
        self.saver = FileSaver(
            setup.sealer,
            setup.gear,
            BlockPool(setup.seal_threads + 1),  # one read ahead of the sealing threads
            self._claim,
            self._new_chunk,
        )
        self.pending: list[Future] = []
        self.arena = -1
        self.offset = 0
        self.objects: list[tuple] = []
        self.unsent = 0  # bytes of the objects not sent yet
        self.entries: list[tuple] = []
        self.retired: list[int] = []  # full arenas not yet reported to the main process
        self.stats = [0, 0, 0, 0]  # files, bytes read, bytes hashed, files from the cache
        self.job = -1

    # ---- objects -------------------------------------------------------------

    def _claim(self, oid: bytes) -> bool:
        with self.lock:
            if oid in self.setup.known or oid in self.claimed:
                return False
            self.claimed.add(oid)
            return True

    def _new_chunk(self, oid: bytes, data: memoryview, block: Block | None) -> None:
        if block is None:
            self._place(oid, data)
        else:
            self.pending.append(self.pool.submit(self._seal_block_chunk, oid, data, block))

    def _seal_block_chunk(self, oid: bytes, data: memoryview, block: Block) -> None:
        try:
            self._place(oid, data)
        finally:
            del data
            block.release()

    def _place(self, oid: bytes, data) -> None:
        """Seals ``data`` into the current arena (or only counts it, in a dry run)."""
        if self.setup.dry_run:
            with self.lock:
                self.objects.append((oid, 0, 0, len(data)))
            return
        sealer = self.setup.sealer
        payload, flags = sealer.pack(data, compressible(data))  # outside the lock: zstd is slow
        size = envelope.OVERHEAD + len(payload)
        with self.lock:
            if self.arena < 0 or self.offset + size > ARENA_BYTES:
                if self.arena >= 0:  # full: the main process frees it once it is framed
                    self.retired.append(self.arena)
                    self._flush(done=False)
                self.arena = self._take_arena()
                self.offset = 0
            start = self.offset
            # Encrypted straight into the arena (under the lock: a flush must not send
            # it half-written), so no envelope object is made and copied per chunk.
            sealer.seal_into(oid, payload, flags, self.arenas[self.arena][start : start + size])
            self.offset += size
            self.objects.append((oid, start, size, len(data)))
            self.unsent += size
            if self.unsent >= MESSAGE_BYTES:
                self._flush(done=False)

    def _take_arena(self) -> int:
        """A free arena; waits for the main process to free one (holding the lock)."""
        if not self.free:
            self.conn.send(("starved",))
        while not self.free:
            message = self.conn.recv()
            if message[0] == "free":
                self.free.append(message[1])
            else:
                self.queued.append(message)
        return self.free.pop()

    def _flush(self, done: bool) -> None:
        """Sends the entries and objects gathered so far (the arena then is the main's)."""
        with self.lock:
            if not (done or self.entries or self.objects or self.retired):
                return
            arena = self.arena if self.objects and not self.setup.dry_run else -1
            message = (self.job, done, arena, self.objects, self.entries, self.stats)
            self.conn.send(("entries", *message, self.retired))
            self.objects, self.entries, self.stats, self.retired = [], [], [0, 0, 0, 0], []
            self.unsent = 0

    def _add(self, entry: tuple) -> None:
        with self.lock:
            self.entries.append(entry)
            if len(self.entries) >= MESSAGE_ENTRIES:
                self._flush(done=False)

    def _error(self, message: str) -> None:
        self.conn.send(("error", message))

    # ---- entries ---------------------------------------------------------------

    def run(self) -> None:
        while True:
            message = self.queued.popleft() if self.queued else self.conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "free":
                self.free.append(message[1])
            elif message[0] == "dir":
                _, self.job, path, descend = message
                self._scan(path, descend)
                self._flush(done=True)

    def _scan(self, path: str, descend: bool) -> None:
        entries = []
        if descend and not self.setup.excludes.contents_excluded(path):
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: os.fsencode(e.name))
            except OSError as exc:
                self._error(f"cannot read directory {path}: {exc.strerror}")
        self.conn.send(("count", self.job, len(entries)))
        now_ns = time.time_ns()
        upcoming = enumerate(entries)
        ahead: deque[_Looked] = deque()
        try:
            while True:
                while len(ahead) < READ_AHEAD_ENTRIES:
                    item = next(upcoming, None)
                    if item is None:
                        break
                    ahead.append(self._look(item[0], item[1].path, os.fsencode(item[1].name)))
                if not ahead:
                    return
                self._add(self._entry(ahead[0], now_ns))  # on failure its fd is closed below
                ahead.popleft()
        finally:
            for looked in ahead:  # an error ended the scan: nothing will read them
                if looked.fd is not None:
                    os.close(looked.fd)

    def _look(self, index: int, path: str, name: bytes) -> _Looked:
        """The lstat of an entry, and for a file to read, its descriptor with its first
        bytes asked of the disk already (``READ_AHEAD_BYTES``).

        This runs ``READ_AHEAD_ENTRIES`` ahead of the entries being saved, so the
        disk reads several files at once instead of one after the other (a cold
        page cache otherwise left the CPUs idle most of a backup).
        """
        rules = self.setup.excludes
        if rules.excluded(path):
            return _Looked(index, path, name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            return _Looked(index, path, name, problem=f"cannot stat {path}: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            return _Looked(index, path, name, st)
        if rules.too_large(st.st_size):
            return _Looked(index, path, name)
        looked = _Looked(index, path, name, st, path_b=os.fsencode(path))
        looked.found = self._unchanged(looked.path_b, st)
        if looked.found is None and st.st_size:
            with contextlib.suppress(OSError):  # the save reports it when it opens again
                looked.fd = open_to_read(path, st)
                os.posix_fadvise(looked.fd, 0, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        return looked

    def _unchanged(self, path_b: bytes, st: os.stat_result):
        """(place, record) of the files cache for a file unchanged since the last backup
        whose chunks the repository still has; None if it must be read."""
        files = self.setup.files
        found = files.find_unchanged(path_b, st) if files is not None else None
        if found is None:
            return None
        ids = found[1].chunk_ids
        known = self.setup.known
        if ids in known if len(ids) == ID_SIZE else all(known.contains_many(split_ids(ids))):
            return found
        return None

    def _entry(self, looked: _Looked, now_ns: int) -> tuple:
        index, path, name, st = looked.index, looked.path, looked.name, looked.st
        if st is None:
            if looked.problem:
                self._error(looked.problem)
            return index, SKIP, None
        mode = st.st_mode
        if stat.S_ISREG(mode):
            return self._file(looked, now_ns)
        if stat.S_ISDIR(mode):
            node = self.nodes.directory(path, name, st)
            other_fs = self.setup.excludes.one_file_system and st.st_dev != self.setup.root_dev
            return index, DIR, (node.SerializeToString(deterministic=True), path, not other_fs)
        try:
            node = self.nodes.other(path, name, st)
        except OSError as exc:
            self._error(f"cannot read link {path}: {exc.strerror}")
            return index, SKIP, None
        if node is None:
            self.conn.send(("warn", f"skipping socket {path}"))
            return index, SKIP, None
        return index, NODE, node.SerializeToString(deterministic=True)

    def _file(self, looked: _Looked, now_ns: int):
        index, path, name, st = looked.index, looked.path, looked.name, looked.st
        node = self.nodes.file(path, name, st)
        if looked.found is not None:
            place, cached = looked.found
            node.size = cached.size
            node.chunk_ids = ids = cached.chunk_ids
            node.chunk_sizes = cached.chunk_sizes
            self.stats[0] += 1
            self.stats[1] += cached.size
            self.stats[3] += 1
            return index, FILE, (node.SerializeToString(deterministic=True), ids, place)
        fd, looked.fd = looked.fd, None  # the save closes it
        saved = self.saver.save(path, st, self._error, fd)
        if self.pending:  # every chunk of the file is placed before its entry is sent
            pending, self.pending = self.pending, []
            for future in pending:
                future.result()
        if saved is None:
            return index, SKIP, None
        node.size = saved.size
        node.chunk_ids = ids = b"".join(saved.ids)
        node.chunk_sizes = tree.pack_sizes(saved.sizes)
        self.stats[0] += 1
        self.stats[1] += saved.size
        self.stats[2] += saved.size
        record = None  # the files-cache record, made here rather than in the main process
        if saved.steady and saved.size == saved.stat.st_size and cacheable(saved.stat, now_ns):
            record = record_of(looked.path_b, saved.stat, ids, node.chunk_sizes)
        return index, FILE, (node.SerializeToString(deterministic=True), ids, record)


def _die_with_parent(parent: int) -> None:
    """Makes the kernel kill this worker when the main process dies (even by kill -9).

    Otherwise an orphaned worker would hold the main process's stdout and
    stderr open, and whoever waits for them would wait for ever.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _worker_main(
    conn: Channel,
    setup: WorkerSetup,
    arenas: list[mmap.mmap],
    parent: int,
    others: list[Channel],
) -> None:
    code = 0
    try:
        _die_with_parent(parent)
        for other in others:  # the main's ends of earlier workers' pipes: theirs, not ours
            other.close()
        _Worker(conn, setup, arenas).run()
    except BaseException:
        code = 1
        with contextlib.suppress(OSError):
            conn.send(("fatal", traceback.format_exc(limit=8)))
    finally:
        os._exit(code)  # no atexit handlers, nothing of the parent's gRPC runs here


class WorkerPool:
    """``count`` forked workers, their pipes and arenas, and how many jobs each holds."""

    def __init__(self, count: int, setup: WorkerSetup):
        self.conns: list[Channel] = []
        self.arenas: list[list[memoryview]] = []
        self.maps: list[list[mmap.mmap]] = []
        self.procs: list[Child] = []
        self.load: list[int] = []
        self._stopping = False
        # What exists now (the id set, the files cache) is never scanned again, in
        # the workers (so their inherited pages stay shared) or in the main process.
        # Only the young generations are collected first: a full collection took
        # 13-21 ms of every backup's start here (the imported modules) and found nothing.
        gc.collect(1)
        gc.freeze()
        try:
            for _ in range(count):
                maps = [mmap.mmap(-1, ARENA_BYTES) for _ in range(ARENAS)]
                ours, theirs = channel_pair()
                proc = Child(_worker_main, (theirs, setup, maps, os.getpid(), list(self.conns)))
                theirs.close()
                self.conns.append(ours)
                self.arenas.append([memoryview(m) for m in maps])
                self.maps.append(maps)
                self.procs.append(proc)
                self.load.append(0)
        except BaseException:
            self.stop(kill=True)
            raise

    def least_loaded(self) -> int | None:
        """The worker with the fewest jobs, if it has room for another."""
        index = min(range(len(self.load)), key=self.load.__getitem__)
        return index if self.load[index] < JOBS_AHEAD else None

    def send(self, worker: int, message: tuple) -> None:
        try:
            self.conns[worker].send(message)
        except OSError:
            raise self.died(worker) from None

    def died(self, worker: int) -> IntegrityError:
        """The error for a worker that is gone, naming how it ended."""
        proc = self.procs[worker]
        proc.join(timeout=1)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return IntegrityError(f"a backup worker process died ({how}); nothing was committed")

    def ask_to_stop(self) -> None:
        """Tells every worker to leave once its work is done (``stop`` waits for that)."""
        if not self._stopping:
            self._stopping = True
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.send(("stop",))

    def stop(self, kill: bool = False) -> None:
        """Ends the workers: asks them to stop (``kill``: does not wait for them)."""
        self.ask_to_stop()
        for proc in self.procs:
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def on_framed(pool: WorkerPool, worker: int, arena: int, counts: dict) -> Callable[[], None]:
    """A callback that frees ``arena`` of ``worker`` when its last object is framed."""

    def done() -> None:
        key = (worker, arena)
        counts[key] -= 1
        if counts[key] == 0:
            del counts[key]
            # This process's view of the pages goes (the worker's stays): read
            # arenas would otherwise all count in its resident size.
            pool.maps[worker][arena].madvise(mmap.MADV_DONTNEED)
            pool.send(worker, ("free", arena))

    return done
