"""Backing up a directory tree.

The walker visits the tree depth first in name order. Each regular file is
read through a reusable buffer and cut into content-defined chunks; worker
threads name each chunk (keyed BLAKE3), skip it if the repository or this
session already has it, otherwise compress, encrypt and hand it to the
uploader. When a directory is complete its ``Tree`` object is stored the
same way; the root tree and statistics go into the snapshot record, which is
committed only after the server has made every object durable.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pysrbup._native import chunker
from pysrbup.client.idcache import IdCache
from pysrbup.client.progress import Progress
from pysrbup.client.reader import ChunkReader
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.uploader import Uploader
from pysrbup.errors import UsageError
from pysrbup.proto import repo_pb2
from pysrbup.repo import snapshot, tree

SNAPSHOT_VERSION = 1


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


class Backup:
    """One backup run against an open remote repository."""

    def __init__(
        self,
        repo: RemoteRepository,
        num_threads: int = 2,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.repo = repo
        self.key = repo._require_key()
        self.num_threads = max(1, num_threads)
        self.progress = progress or Progress("backup", enabled=False)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.result = BackupResult()
        self._known: set[bytes] = set()
        self._claimed: set[bytes] = set()
        # Every id this backup references (uploaded or deduplicated): before the
        # commit, any of them condemned by a concurrent delete is revived.
        self._used: set[bytes] = set()
        self._lock = threading.Lock()
        self._gear = chunker.gear_table(self.key.gear_seed)
        self._reader = ChunkReader(self._gear)
        self._slots = threading.BoundedSemaphore(self.num_threads * 3)
        self._names: dict[tuple[int, int], tuple[str, str]] = {}

    # ---- objects -------------------------------------------------------

    def _store(self, data, oid: bytes | None = None) -> bytes:
        """Names ``data`` and uploads it unless the repository already has it."""
        if oid is None:
            oid = self._sealer.object_id(data)
        with self._lock:
            self._used.add(oid)
            if oid in self._known or oid in self._claimed:
                return oid
            self._claimed.add(oid)
        sealed = self._sealer.seal(oid, data)
        self._uploader.put(oid, sealed)
        with self._lock:
            self.result.bytes_new += len(data)
            self.result.chunks_new += 1
        return oid

    def _store_chunk(self, data: bytes) -> bytes:
        try:
            return self._store(data)
        finally:
            self._slots.release()

    # ---- walking -------------------------------------------------------

    def _save_file(self, path: str, name: bytes, st: os.stat_result) -> repo_pb2.Node | None:
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            self._error(f"cannot read {path}: {exc.strerror}")
            return None
        futures: list[Future] = []
        sizes: list[int] = []
        try:
            with handle:
                for chunk in self._reader.chunks(handle):
                    self._slots.acquire()
                    data = bytes(chunk)
                    sizes.append(len(data))
                    futures.append(self._pool.submit(self._store_chunk, data))
                    self.progress.add_bytes(len(data))
        except OSError as exc:
            for fut in futures:
                fut.cancel()
            self._error(f"error reading {path}: {exc.strerror}")
            return None
        node = _base_node(name, st, repo_pb2.NODE_FILE)
        node.size = sum(sizes)
        node.chunk_sizes = tree.pack_sizes(sizes)
        node.chunk_ids = b"".join(f.result() for f in futures)
        self.result.files += 1
        self.result.bytes_read += node.size
        self.progress.add_file()
        return node

    def _save_dir(self, path: str, name: bytes, st: os.stat_result) -> repo_pb2.Node | None:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            self._error(f"cannot read directory {path}: {exc.strerror}")
            return None
        nodes = []
        for entry in entries:
            node = self._save_entry(entry.path, os.fsencode(entry.name))
            if node is not None:
                nodes.append(node)
        node = _base_node(name, st, repo_pb2.NODE_DIR)
        node.subtree = self._store(tree.serialize(nodes))
        self.result.dirs += 1
        return node

    def _save_entry(self, path: str, name: bytes) -> repo_pb2.Node | None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._error(f"cannot stat {path}: {exc.strerror}")
            return None
        if stat.S_ISREG(st.st_mode):
            node = self._save_file(path, name, st)
        elif stat.S_ISDIR(st.st_mode):
            node = self._save_dir(path, name, st)
        elif stat.S_ISLNK(st.st_mode):
            node = _base_node(name, st, repo_pb2.NODE_SYMLINK)
            try:
                node.link_target = os.fsencode(os.readlink(path))
            except OSError as exc:
                self._error(f"cannot read link {path}: {exc.strerror}")
                return None
        else:
            self.warn(f"skipping special file {path}")
            return None
        if node is not None:
            node.user, node.group = self._owner(st)
        return node

    def _owner(self, st: os.stat_result) -> tuple[str, str]:
        key = (st.st_uid, st.st_gid)
        if key not in self._names:
            self._names[key] = _owner_names(st)
        return self._names[key]

    def _error(self, message: str) -> None:
        self.result.errors.append(message)
        self.warn(message)

    # ---- the run -------------------------------------------------------

    def _count_total(self, source: str) -> None:
        total = 0
        for root, _dirs, files in os.walk(source):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        self.progress.set_total(total)

    def run(self, source: str) -> BackupResult:
        """Backs up the directory ``source`` and returns the result with its id."""
        started = time.monotonic()
        source = os.path.abspath(source)
        try:
            st = os.stat(source)
        except OSError as exc:
            raise UsageError(f"cannot back up {source}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{source} is not a directory")
        repo = self.repo
        repo.ensure_registered()
        cache = IdCache(repo.repo_id)
        # The session begins before the id sync: a delete condemning ids after
        # this point cannot sweep them until the session ends.
        session_id = repo.conn.begin_session()
        cache.sync(repo.conn, repo.info.id_log_epoch)
        self._known = cache.ids
        self._sealer = repo.new_session_sealer()
        self._uploader = Uploader(repo.conn, session_id)
        threading.Thread(target=self._count_total, args=(source,), daemon=True).start()
        try:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="pysrbup-seal") as pool:
                self._pool = pool
                root = self._save_dir(source, os.fsencode(os.path.basename(source) or "root"), st)
            if root is None:
                raise UsageError(f"cannot read directory {source}")
            root.user, root.group = self._owner(st)
            root_tree = self._store(tree.serialize([root]))
            stats = self._uploader.finish()
            self.result.bytes_sent = stats.bytes_sent
            record = repo_pb2.Snapshot(
                version=SNAPSHOT_VERSION,
                time_ns=time.time_ns(),
                hostname=socket.gethostname(),
                username=getpass.getuser(),
                source_path=os.fsencode(source),
                root_tree=root_tree,
                files=self.result.files,
                dirs=self.result.dirs,
                logical_bytes=self.result.bytes_read,
                bytes_new=self.result.bytes_new,
                bytes_sent=self.result.bytes_sent,
                session_key_id=self._sealer.key_id,
            )
            backup_id, sealed = snapshot.seal_snapshot(self._sealer, record)
            repo.commit_backup(cache, session_id, backup_id, sealed, self._used)
        except BaseException:
            self._abort(session_id)
            raise
        finally:
            self.progress.close()
        self.result.backup_id = backup_id
        self.result.duration = time.monotonic() - started
        return self.result

    def _abort(self, session_id: str) -> None:
        with contextlib.suppress(Exception):
            self._uploader.finish()
        self.repo.conn.end_session(session_id)
