"""Backing up a directory tree: worker processes do the per-file work, the main process
assembles trees and uploads.

::

    worker processes xN    scandir, lstat, xattrs, node ─▶ files cache hit? ─▶ node as cached
    (workers.py)           miss: read (pooled buffers) ─▶ CDC cut points ─▶ keyed BLAKE3 id
                           ─▶ new? zstd + AES-256-GCM into a shared-memory arena
          │ descriptors only: entries (node bytes, chunk ids), objects (arena, offset, length)
          ▼
    main process           claims each object (one copy per id), hands arena bytes to the
                           uploader without copying, frees arenas once framed; builds each
                           directory's tree from its entries' bytes when the last one is in
          ▼
    uploader thread        raw-bytes stream; acks as frames become durable
                           ─▶ files cache entries whose chunks are now all durable

Why processes: on trees of many small files the cost is per file (a handful
of system calls and some Python per entry), and threads of one process hand
the GIL back and forth at every one of them (38 futex calls per file were
measured). Each worker runs its small files start to end on one thread; the
chunks of a large file are sealed by a few threads inside the worker (zstd and
AES-GCM release the GIL). ``num_threads`` is the number of worker processes
(default: the machine's cores); the main process adds an uploader thread.

Directories complete asynchronously: each keeps a count of unfinished
entries, and when the last one is in, its ``Tree`` object is stored and it
reports to its parent. The snapshot record is committed only after the
uploader has every object acknowledged as durable. ``backup --stdin`` saves
one stream in the main process, with the same ``FileSaver``.
"""

from __future__ import annotations

import contextlib
import gc
import getpass
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pysrbup._native import chunker
from pysrbup.client import ipc, workers
from pysrbup.client.excludes import Excludes
from pysrbup.client.file_saver import Block, BlockPool, FileSaver, seal
from pysrbup.client.filescache import FilesCache
from pysrbup.client.idcache import IdCache
from pysrbup.client.idset import IdList, IdSet
from pysrbup.client.nodes import NodeMaker
from pysrbup.client.progress import Progress
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.retry import retrying
from pysrbup.client.session import SessionHolder
from pysrbup.client.uploader import Uploader
from pysrbup.errors import IntegrityError, NotFoundError, UsageError
from pysrbup.proto import repo_pb2
from pysrbup.repo import envelope, snapshot, tree
from pysrbup.repo.wire import ID_SIZE, split_ids
from pysrbup.textsafe import printable

SNAPSHOT_VERSION = 1
#: Reused ids whose presence a backup confirms before it commits (a random sample).
CONFIRM_SAMPLE = 8192
#: Threads sealing the chunks of one large file, per worker process.
SEAL_THREADS = 2


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


class _Dir:
    """A directory whose entries are still being saved (main process only)."""

    __slots__ = ("index", "node", "nodes", "parent", "remaining")

    def __init__(self, node: repo_pb2.Node, parent: _Dir | None, index: int):
        self.node = node
        self.parent = parent
        self.index = index
        self.nodes: list[bytes | None] = []  # each entry's serialised node, in name order
        self.remaining = 1  # released once the worker has sent every entry


class _PendingEntry:
    """A files-cache record waiting for its chunks to become durable."""

    __slots__ = ("record", "waiting")

    def __init__(self, record: bytes):
        self.record = record
        self.waiting = 0


class Backup:
    """One backup run against an open remote repository."""

    def __init__(
        self,
        repo: RemoteRepository,
        num_threads: int | None = None,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
        excludes: Excludes | None = None,
        xattrs: bool = True,
        dry_run: bool = False,
    ):
        self.repo = repo
        self.dry_run = dry_run
        self._excludes = excludes or Excludes()
        self._read_xattrs = xattrs
        self.key = repo._require_key()
        self.num_threads = max(1, num_threads or os.cpu_count() or 1)
        self.progress = progress or Progress("backup", enabled=False)
        self.warn = warn or (
            lambda message: print(f"warning: {printable(message)}", file=sys.stderr)
        )
        self.result = BackupResult()
        self._known = IdSet()
        self._claimed: set[bytes] = set()
        # Every id this backup references (uploaded or deduplicated): before the
        # commit, any of them condemned by a concurrent delete is revived. Kept as
        # concatenated ids, an IdList at the end (sorted only if a condemnation asks).
        self._used = IdList(bytearray())
        self._used_ids = bytearray()  # 32 bytes an id, repeats included
        # Claimed by this session, not yet acknowledged durable -> entries waiting on it.
        # (None until an entry waits: most objects never get a list.)
        self._not_durable: dict[bytes, list[_PendingEntry] | None] = {}
        self._lock = threading.Lock()
        self._gear = chunker.gear_table(self.key.gear_seed)
        self._fatal: BaseException | None = None
        self._files: FilesCache | None = None
        self._pool: workers.WorkerPool | None = None
        self._uploader: Uploader | None = None

    # ---- objects -------------------------------------------------------

    def _claim(self, oid: bytes) -> bool:
        """True if this backup must upload ``oid`` (neither stored nor claimed already)."""
        if oid in self._known:
            self._used_ids += oid
            return False
        return self._claim_unknown(oid)

    def _claim_unknown(self, oid: bytes) -> bool:
        """``_claim`` of an id known to be outside the synced set (a worker checked it)."""
        with self._lock:
            self._used_ids += oid
            if oid in self._claimed:
                return False
            self._claimed.add(oid)
            self._not_durable[oid] = None
            return True

    def _count_new(self, plain_bytes: int) -> None:
        with self._lock:
            self.result.bytes_new += plain_bytes
            self.result.chunks_new += 1

    def _seal_and_put(self, oid: bytes, data) -> None:
        if not self.dry_run:
            self._uploader.put(oid, seal(self._sealer, oid, data))
        self._count_new(len(data))

    def _store(self, data) -> bytes:
        """Names ``data`` and uploads it unless the repository already has it."""
        oid = self._sealer.object_id(data)
        if self._claim(oid):
            self._seal_and_put(oid, data)
        return oid

    # ---- durability and the files cache ---------------------------------

    def _on_durable(self, oids: list[bytes]) -> None:
        """Uploader callback: these objects are stored; record files now complete."""
        ready = []
        with self._lock:
            for oid in oids:
                for entry in self._not_durable.pop(oid, None) or ():
                    entry.waiting -= 1
                    if entry.waiting == 0:
                        ready.append(entry)
        files = self._files
        if files is not None:
            for entry in ready:
                files.append_record(entry.record)
            files.flush()

    def _record_file(self, ids: bytes, record: bytes) -> None:
        """Adds a files cache record once every chunk the file names is durable."""
        if self._files is None:
            return
        entry = _PendingEntry(record)
        with self._lock:
            for oid in (ids,) if len(ids) == ID_SIZE else split_ids(ids):
                if oid in self._not_durable:
                    waiters = self._not_durable[oid]
                    if waiters is None:
                        waiters = self._not_durable[oid] = []
                    waiters.append(entry)
                    entry.waiting += 1
        if entry.waiting == 0:
            self._files.append_record(record)

    # ---- the tree, in the main process -----------------------------------------

    def _finish_entry_bytes(self, parent: _Dir, index: int, encoded: bytes | None) -> None:
        """Records one finished entry (its node's bytes, None if skipped); stores the
        directory when it was the last one, and so on up."""
        while True:
            if index >= 0:
                parent.nodes[index] = encoded
            parent.remaining -= 1
            if parent.remaining:
                return
            parent.node.subtree = self._store(
                tree.encode([n for n in parent.nodes if n is not None])
            )
            self.result.dirs += 1
            if parent.parent is None:
                self._root_node = parent.node
                return
            encoded = parent.node.SerializeToString(deterministic=True)
            parent, index = parent.parent, parent.index

    def _error(self, message: str) -> None:
        with self._lock:
            self.result.errors.append(message)
        self.warn(message)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = exc

    # ---- the run -------------------------------------------------------

    def _count_total(self, source: str) -> None:
        total = 0
        for root, _dirs, files in os.walk(source):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        self.progress.set_total(total)

    def _start_workers(self, source: str, st: os.stat_result) -> None:
        """Forks the worker processes (before the uploader thread exists)."""
        setup = workers.WorkerSetup(
            sealer=self._sealer,
            gear=self._gear,
            known=self._known,
            files=self._files,
            excludes=self._excludes,
            read_xattrs=self._read_xattrs,
            root_dev=st.st_dev,
            dry_run=self.dry_run,
            seal_threads=SEAL_THREADS,
        )
        self._pool = workers.WorkerPool(self.num_threads, setup)
        self._files.leave_to_workers()  # they look files up; this process only keeps
        # Per file the main process makes a few small objects; with the long-lived
        # ones frozen by the pool, collecting every 700 allocations is all cost.
        self._gc_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)

    def _run_workers(self, source: str, st: os.stat_result) -> repo_pb2.Node:
        """Walks ``source`` with the worker processes; returns its node (subtree set)."""
        pool = self._pool
        assert pool is not None
        nodes = NodeMaker(self._read_xattrs)
        root = nodes.directory(source, os.fsencode(os.path.basename(source) or "root"), st)
        self._root_node: repo_pb2.Node | None = None
        jobs: dict[int, _Dir] = {}
        waiting: deque[tuple[int, str, bool]] = deque()
        framing: dict[tuple[int, int], int] = {}
        next_job = [0]

        def dispatch(path: str, node: repo_pb2.Node, parent: _Dir | None, index: int, descend):
            job = next_job[0]
            next_job[0] += 1
            jobs[job] = _Dir(node, parent, index)
            waiting.append((job, path, descend))

        dispatch(source, root, None, -1, True)
        try:
            while self._root_node is None:
                while waiting:
                    worker = pool.least_loaded()
                    if worker is None:
                        break
                    job, path, descend = waiting.popleft()
                    pool.load[worker] += 1
                    pool.send(worker, ("dir", job, path, descend))
                if self._fatal is not None:
                    raise self._fatal
                for conn in ipc.readable(pool.conns, timeout=1.0):
                    worker = pool.conns.index(conn)
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        raise pool.died(worker) from None
                    self._handle(pool, worker, message, jobs, dispatch, framing)
        finally:
            self._uploader_flush()
        return self._root_node

    def _handle(self, pool, worker: int, message: tuple, jobs, dispatch, framing) -> None:
        kind = message[0]
        if kind == "entries":
            _, job, done, arena, objects, entries, stats, retired = message
            self._take_objects(pool, worker, arena, objects, framing)
            for full in retired:  # freed once everything in it is framed
                framing.setdefault((worker, full), 1)
                workers.on_framed(pool, worker, full, framing)()
            state = jobs[job]
            for index, what, payload in entries:
                if what == workers.FILE:
                    self._take_file(payload)
                    self._finish_entry_bytes(state, index, payload[0])
                elif what == workers.DIR:
                    encoded, path, descend = payload
                    dispatch(path, repo_pb2.Node.FromString(encoded), state, index, descend)
                else:  # NODE, or SKIP (None)
                    self._finish_entry_bytes(state, index, payload)
            files, read, hashed, cached = stats
            res = self.result
            res.files += files
            res.bytes_read += read
            res.bytes_hashed += hashed
            res.files_cached += cached
            if read:
                self.progress.add_bytes(read)
            for _ in range(files):
                self.progress.add_file()
            if done:
                pool.load[worker] -= 1
                del jobs[job]
                self._finish_entry_bytes(state, -1, None)
        elif kind == "count":
            _, job, count = message
            state = jobs[job]
            state.nodes = [None] * count
            state.remaining += count
        elif kind == "error":
            self._error(message[1])
        elif kind == "warn":
            self.warn(message[1])
        elif kind == "starved":
            self._uploader_flush()  # frames what is batched, so its arenas come free
        elif kind == "fatal":
            raise RuntimeError(f"a backup worker process failed:\n{message[1]}")

    def _take_objects(self, pool, worker: int, arena: int, objects, framing) -> None:
        """Claims the objects a worker sealed; the new ones go to the uploader."""
        if self.dry_run:
            for oid, _, _, plain in objects:
                if self._claim(oid):
                    self._count_new(plain)
            return
        if arena < 0:
            return
        key = (worker, arena)
        framing.setdefault(key, 1)  # held until the worker retires the arena
        freed = workers.on_framed(pool, worker, arena, framing)
        view = pool.arenas[worker][arena]
        for oid, offset, length, plain in objects:
            if self._claim_unknown(oid):
                framing[key] += 1
                self._uploader.put(oid, view[offset : offset + length], freed)
                self._count_new(plain)

    def _take_file(self, payload: tuple) -> None:
        """A worker's file: its ids are used; its files-cache record (bytes) is added
        once durable, or its cached entry (the place, an int) is kept."""
        _, ids, cache = payload
        self._used_ids += ids
        if cache is None or self._files is None:
            return
        if isinstance(cache, int):
            self._files.keep_place(cache)
        else:
            self._record_file(ids, cache)

    def _uploader_flush(self) -> None:
        if self._uploader is not None:
            self._uploader.flush()

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
        return self._run(
            os.fsencode(source),
            lambda: self._run_workers(source, st),
            tags,
            host,
            time_ns,
            prepare=lambda: self._start_workers(source, st),
            count=lambda: self._count_total(source),
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

    def _seal_job(self, oid: bytes, data, block: Block) -> None:
        try:
            self._seal_and_put(oid, data)
        except BaseException as exc:
            self._fail(exc)
        finally:
            del data
            block.release()

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
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="pysrbup-seal") as seals:

            def check_failed() -> None:
                if self._fatal is not None:
                    raise self._fatal

            saver = FileSaver(
                self._sealer,
                self._gear,
                BlockPool(2 * self.num_threads),
                self._claim,
                lambda oid, data, block: seals.submit(self._seal_job, oid, data, block),
                self.progress.add_bytes,
                check_failed,
            )
            size, ids, sizes = saver.read_blocks(stream)
        if self._fatal is not None:
            raise self._fatal
        node.size = size
        node.chunk_ids = b"".join(ids)
        node.chunk_sizes = tree.pack_sizes(sizes)
        self.result.files = 1
        self.result.bytes_read = self.result.bytes_hashed = size
        return node

    def _run(
        self,
        source_b: bytes,
        make_root,
        tags,
        host,
        time_ns,
        prepare: Callable[[], None] = lambda: None,
        count: Callable[[], None] | None = None,
    ) -> BackupResult:
        """A backup session around ``make_root()`` (the root node), committed as a snapshot.

        ``prepare`` runs once keys, ids and caches are ready and before any
        thread of the backup starts (it forks the workers).
        """
        started = time.monotonic()
        if self.dry_run:
            return self._dry_run(make_root, prepare, started)
        repo = self.repo
        repo.ensure_initialised()
        cache = IdCache(repo.repo_id)
        # The session begins before the id sync: a delete condemning ids after
        # this point cannot sweep them until the session ends.
        self._sessions = SessionHolder(repo.begin_session)
        cache.sync(repo.conn)
        self._known = cache.ids
        self._sealer = repo.new_session_sealer(self._sessions.current)
        self._files = FilesCache(repo.repo_id).open()
        try:
            prepare()
            self._start_counting(count)
            self._uploader = Uploader(
                repo.conn, self._sessions, on_durable=self._on_durable, warn=self.warn
            )
            root = make_root()
            if self._pool is not None:  # they end while the snapshot is committed
                self._pool.ask_to_stop()
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
            self._used, self._used_ids = IdList(self._used_ids), bytearray()
            self._confirm_deduplicated(cache)
            self._commit(cache, backup_id, sealed)
            self._files.compact(source_b)
        except BaseException:
            self._abort()
            raise
        finally:
            self._stop_workers()
            self._files.close()
            self.progress.close()
        self.result.backup_id = backup_id
        self.result.duration = time.monotonic() - started
        return self.result

    def _start_counting(self, count: Callable[[], None] | None) -> None:
        """Counts the bytes to read for the progress bar's ETA, if there is a bar."""
        if count is not None and getattr(self.progress, "wants_total", True):
            threading.Thread(target=count, daemon=True).start()

    def _stop_workers(self, kill: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop(kill)
            gc.unfreeze()
            gc.set_threshold(*self._gc_threshold)

    def _dry_run(self, make_root, prepare, started: float) -> BackupResult:
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
            prepare()
            root = make_root()
            self._store(tree.serialize([root]))
            if self._fatal is not None:
                raise self._fatal
        finally:
            self._stop_workers()
            self._files.close()
            self.progress.close()
        self.result.duration = time.monotonic() - started
        return self.result

    def _confirm_deduplicated(self, cache: IdCache) -> None:
        """Checks that the repository holds a sample of what this backup reused.

        The id log only says what the server claims. One batched existence
        query for up to ``CONFIRM_SAMPLE`` reused ids, chosen at random (32
        bytes each), confirms it before the snapshot can depend on them: a
        lost pack holds many objects, so a sample finds it, while the server
        learns only that sample of what the backup reuses, and an unchanged
        backup of many files does not make it look up every id. ``check``
        confirms every one. Ids it lacks are dropped from the local cache so
        the next run uploads them.
        """
        with self._lock:
            reused = self._used.sample(CONFIRM_SAMPLE, unless=self._claimed.__contains__)
        missing = self.repo.missing_objects(reused)
        if missing:
            cache.discard(missing)
            raise IntegrityError(
                f"the repository lacks {len(missing)} object(s) its id log lists and this "
                "backup reuses; they are forgotten locally: run the backup again to upload "
                "them, and run check to see which backups they damage"
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
        self._stop_workers(kill=True)
        if self._uploader is not None:
            with contextlib.suppress(Exception):
                self._uploader.abort()
        sessions = getattr(self, "_sessions", None)
        if sessions is not None:
            with contextlib.suppress(Exception):
                self.repo.end_session(sessions.current)
