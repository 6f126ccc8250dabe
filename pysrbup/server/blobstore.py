"""Blob stores: where a repository's objects live, a local directory or an S3 bucket.

The interface is restic's ``backend.Backend`` / kopia's ``blob.Storage`` cut
down to what the server needs: whole-object ``put`` (atomic: readers see the
old object or the new one, never a part), ranged ``get``, ``stat``,
``list(folder)`` and ``delete``, plus ``put_new`` (create only, the bucket
lock). Names are ``/``-separated paths in a few namespaces (``names`` below);
the same names are file paths under a ``LocalStore``'s directory, so the
local layout is the one the server always had (docs/design.md §8).

Objects are written once: nothing here appends to or patches an object.
``put`` of an existing name replaces it whole (repair writes a pack's
original bytes back that way).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from pysrbup.errors import RepositoryError, UsageError
from pysrbup.fileio import pread_into
from pysrbup.server.packs import fsync_dir, storage_error


class BlobNotFoundError(FileNotFoundError):
    """The named object does not exist in the store."""


# ---- names: the namespaces of a repository ----------------------------------------

CONFIG = "config"
LOCK = "lock"
KEYS = "keys"
SNAPSHOTS = "snapshots"
DELETED = "deleted"
PACKS = "packs"
PACK_SUFFIX = ".pack"
PARITY_SUFFIX = ".ecc"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def pack_name(pack_id_hex: str) -> str:
    """``packs/<hh>/<pack id>.pack``."""
    return f"{PACKS}/{pack_id_hex[:2]}/{pack_id_hex}{PACK_SUFFIX}"


def parity_name(pack: str) -> str:
    """The parity sidecar of the pack named ``pack``: ``packs/<hh>/<pack id>.ecc``."""
    return pack.removesuffix(PACK_SUFFIX) + PARITY_SUFFIX


def check_name(name: str) -> str:
    """``name`` if it is a plain relative object name (no ``..``, no empty parts)."""
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise UsageError(f"bad object name {name!r}")
    return name


@dataclass
class StoreStats:
    """Requests made to a store and bytes moved, since it was opened (figures, metrics)."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, op: str, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            self.bytes_sent += sent
            self.bytes_received += received

    def snapshot(self) -> dict[str, int]:
        """Totals: requests per operation, ``requests``, ``bytes_sent``, ``bytes_received``."""
        with self._lock:
            return {
                **{f"requests_{op}": n for op, n in sorted(self.requests.items())},
                "requests": sum(self.requests.values()),
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }


class BlobStore:
    """The interface every store implements (see the module docstring)."""

    #: Where the store is, for messages (a directory or ``s3://bucket/prefix``).
    location: str = ""
    #: The directory the names are files in, for a store on this machine's disk; else None.
    local_root: str | None = None

    def __init__(self) -> None:
        self.stats = StoreStats()

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Stores ``data`` as ``name`` atomically and durably (replacing any old object)."""
        raise NotImplementedError

    def put_file(self, name: str, path: str) -> None:
        """Stores the bytes of the local file ``path`` as ``name``; the file may be moved.

        A store on the same disk renames it into place (no copy), any other
        uploads it; callers remove ``path`` afterwards if it is still there.
        """
        with open(path, "rb") as handle:
            self.put(name, handle.read())

    def put_new(self, name: str, data: bytes) -> bool:
        """Creates ``name`` only if it does not exist; False if it already did."""
        raise NotImplementedError

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``offset`` (all to the end if None); fewer at the end.

        BlobNotFoundError if there is no such object.
        """
        raise NotImplementedError

    def get_into(self, name: str, take: Callable[[int], Any]) -> bytes | memoryview:
        """A whole object, read into ``take(size)`` (a writable buffer) where the store can.

        For callers that reuse one large buffer from object to object (parity
        over packs); this default returns ``get(name)``.
        """
        return self.get(name)

    def stat(self, name: str) -> int | None:
        """The object's size, or None if it does not exist."""
        raise NotImplementedError

    def list(self, folder: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object under ``folder`` (recursively), in no fixed order."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Removes an object; a missing one is not an error."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the store holds open."""


def _temp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"


def _write_synced(tmp: str, data) -> None:
    """Writes ``data`` to the new file ``tmp`` (its directory made if need be), fsynced."""
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class LocalStore(BlobStore):
    """Objects as files under a directory: temporary file, fsync, rename, fsync the directory.

    Reads go through a small cache of open descriptors (``pread``), dropped
    whenever an object is replaced or deleted.
    """

    MAX_OPEN = 64

    def __init__(self, root: str):
        super().__init__()
        self.root = os.path.abspath(root)
        self.location = self.root
        self.local_root = self.root
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()

    def path(self, name: str) -> str:
        """The file of object ``name``."""
        return os.path.join(self.root, *check_name(name).split("/"))

    def _forget(self, name: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def put(self, name: str, data: bytes | memoryview) -> None:
        path = self.path(name)
        tmp = _temp_name(path)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(exc, f"writing {path}") from None
        finally:
            self._forget(name)
        self.stats.add("put", sent=len(data))

    def put_file(self, name: str, path: str) -> None:
        target = self.path(name)
        try:
            size = os.path.getsize(path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.replace(path, target)  # the staging directory is on the same disk
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with open(path, "rb") as handle:
                    self.put(name, handle.read())
                return
            fsync_dir(os.path.dirname(target))
        except OSError as exc:
            raise storage_error(exc, f"moving {path} to {target}") from None
        finally:
            self._forget(name)
        self.stats.add("put", sent=size)

    def put_new(self, name: str, data: bytes) -> bool:
        path = self.path(name)
        tmp = _temp_name(path)
        try:
            _write_synced(tmp, data)
            try:
                os.link(tmp, path)  # fails if it exists: create-only, atomically
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise storage_error(exc, f"writing {path}") from None
        self.stats.add("put", sent=len(data))
        return True

    def _fd(self, name: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is None:
                if len(self._fds) >= self.MAX_OPEN:  # forget the oldest (insertion order)
                    os.close(self._fds.pop(next(iter(self._fds))))
                try:
                    fd = os.open(self.path(name), os.O_RDONLY)
                except FileNotFoundError:
                    raise BlobNotFoundError(f"{self.location}: no object {name}") from None
                self._fds[name] = fd
            return fd

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            fd = self._fd(name)
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            data = os.pread(fd, length, offset)
        except BlobNotFoundError:
            raise
        except OSError as exc:
            self._forget(name)
            raise storage_error(exc, f"reading {self.path(name)}") from None
        self.stats.add("get", received=len(data))
        return data

    def get_into(self, name: str, take: Callable[[int], Any]) -> bytes | memoryview:
        try:
            fd = self._fd(name)
            size = os.fstat(fd).st_size
            view = memoryview(take(size))[:size]
            got = pread_into(fd, view)
        except BlobNotFoundError:
            raise
        except OSError as exc:
            self._forget(name)
            raise storage_error(exc, f"reading {self.path(name)}") from None
        self.stats.add("get", received=got)
        return view[:got]

    def stat(self, name: str) -> int | None:
        self.stats.add("stat")
        try:
            return os.path.getsize(self.path(name))
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> Iterator[tuple[str, int]]:
        self.stats.add("list")
        top = self.path(folder)
        for parent, dirs, files in os.walk(top):
            dirs.sort()
            rel = os.path.relpath(parent, self.root).replace(os.sep, "/")
            for name in sorted(files):
                if ".tmp" in name:  # a write that never completed
                    continue
                with contextlib.suppress(FileNotFoundError):
                    yield f"{rel}/{name}", os.path.getsize(os.path.join(parent, name))

    def delete(self, name: str) -> None:
        self._forget(name)
        path = self.path(name)
        self.stats.add("delete")
        try:
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"deleting {path}") from None

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def remove_temporaries(self) -> int:
        """Deletes what crashed writes left (``*.tmp.*`` files); returns how many."""
        count = 0
        for parent, _, files in os.walk(self.root):
            for name in files:
                if ".tmp." in name or name.endswith(PARITY_SUFFIX + ".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(parent, name))
                        count += 1
        return count


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` and how to reach it."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    @classmethod
    def parse(cls, url: str, **kwargs) -> S3Location:
        """Parses ``s3://bucket[/prefix]``; UsageError when malformed."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise UsageError(f"--storage takes a directory or s3://bucket/prefix, not {url!r}")
        return cls(parsed.netloc, parsed.path.strip("/"), **kwargs)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


class S3Store(BlobStore):
    """Objects in an S3-compatible bucket, through obstore (Rust's object_store).

    Chosen by measurement against boto3 and minio-py on SeaweedFS (docs/design.md
    §8.7): the lowest per-request latency for the small ranged reads a restore
    makes, the cheapest start, and a conditional create (``If-None-Match``)
    for the bucket lock. The endpoint and credentials come from the arguments
    or the usual ``AWS_*`` environment variables.
    """

    def __init__(self, where: S3Location, timeout: float = 30.0, retries: int = 5):
        super().__init__()
        try:
            import obstore
            from obstore.store import S3Store as _ObStore
        except ImportError as exc:  # pragma: no cover - a dependency
            raise RepositoryError(f"S3 storage needs the obstore package: {exc}") from None
        import datetime

        self._ob = obstore
        self.where = where
        self.location = str(where)
        endpoint = where.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self.endpoint = endpoint
        options = {
            "connect_timeout": f"{max(1, int(timeout // 3))}s",
            "timeout": f"{int(timeout)}s",
        }
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        config = {}
        if endpoint:
            config["endpoint"] = endpoint
        region = where.region or os.environ.get("AWS_REGION")
        region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config["region"] = region
        if where.access_key:
            config["access_key_id"] = where.access_key
        if where.secret_key:
            config["secret_access_key"] = where.secret_key
        try:
            self._store = _ObStore(
                where.bucket,
                prefix=where.prefix or None,
                config=config,
                client_options=options,
                retry_config={
                    "max_retries": retries,
                    "retry_timeout": datetime.timedelta(seconds=timeout),
                    "backoff": {
                        "init_backoff": datetime.timedelta(milliseconds=100),
                        "max_backoff": datetime.timedelta(seconds=5),
                        "base": 2.0,
                    },
                },
            )
        except Exception as exc:
            raise RepositoryError(f"{self.location}: {_first_line(exc)}") from None

    def _no_bucket(self) -> Exception:
        return RepositoryError(f"{self.location}: the bucket {self.where.bucket} does not exist")

    def _error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, FileNotFoundError):
            text = str(exc)
            if "NoSuchBucket" in text:
                return RepositoryError(
                    f"{self.location}: the bucket {self.where.bucket} does not exist"
                )
            return BlobNotFoundError(f"{self.location}: no object {what}")
        name = type(exc).__name__
        text = str(exc)
        if name in ("PermissionDeniedError", "UnauthenticatedError") or " 403 " in text:
            return RepositoryError(
                f"{self.location}: access denied (check the credentials in AWS_ACCESS_KEY_ID "
                f"and AWS_SECRET_ACCESS_KEY)"
            )
        if "NoSuchBucket" in text:
            return RepositoryError(
                f"{self.location}: the bucket {self.where.bucket} does not exist"
            )
        if "error sending request" in text or "connect" in text.lower():
            return RepositoryError(
                f"{self.location}: cannot reach the S3 endpoint {self.endpoint or '(AWS)'} "
                f"({what}: {_first_line(exc)[-120:]})"
            )
        return RepositoryError(f"{self.location}: {what} failed: {_first_line(exc)}")

    def check(self) -> None:
        """Fails with one clear line unless the bucket answers (reachable, exists, allowed)."""
        try:
            next(iter(self._ob.list(self._store, prefix=CONFIG, chunk_size=1)), None)
        except Exception as exc:
            raise self._error(exc, "listing the bucket") from None
        self.stats.add("list")

    def put(self, name: str, data: bytes | memoryview) -> None:
        check_name(name)
        try:
            self._ob.put(self._store, name, bytes(data), use_multipart=False)
        except Exception as exc:
            raise self._error(exc, f"put {name}") from None
        self.stats.add("put", sent=len(data))

    def put_new(self, name: str, data: bytes) -> bool:
        check_name(name)
        try:
            self._ob.put(self._store, name, data, mode="create", use_multipart=False)
        except Exception as exc:
            if type(exc).__name__ == "AlreadyExistsError":
                self.stats.add("put")
                return False
            raise self._error(exc, f"put {name}") from None
        self.stats.add("put", sent=len(data))
        return True

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        try:
            if offset == 0 and length is None:
                data = bytes(self._ob.get(self._store, name).bytes())
            else:
                if length == 0:
                    return b""
                end = None if length is None else offset + length
                size = None
                if end is None:
                    size = self.stat(name)
                    if size is None:
                        raise BlobNotFoundError(f"{self.location}: no object {name}")
                    end = size
                    if offset >= end:
                        return b""
                data = bytes(self._ob.get_range(self._store, name, start=offset, end=end))
        except BlobNotFoundError:
            raise
        except Exception as exc:
            if "416" in str(exc):  # past the end (like pread: nothing), or no such object
                self.stats.add("get")
                if self.stat(name) is None:  # SeaweedFS answers 416 for some missing ones
                    raise BlobNotFoundError(f"{self.location}: no object {name}") from None
                return b""
            raise self._error(exc, f"get {name}") from None
        self.stats.add("get", received=len(data))
        return data

    def stat(self, name: str) -> int | None:
        check_name(name)
        try:
            meta = self._ob.head(self._store, name)
        except Exception as exc:
            error = self._error(exc, f"stat {name}")
            self.stats.add("stat")
            if isinstance(error, BlobNotFoundError):
                return None
            raise error from None
        self.stats.add("stat")
        return int(meta["size"])

    def list(self, folder: str) -> Iterator[tuple[str, int]]:
        check_name(folder)
        try:
            for batch in self._ob.list(self._store, prefix=folder):
                self.stats.add("list")
                for meta in batch:
                    yield meta["path"], int(meta["size"])
        except Exception as exc:
            raise self._error(exc, f"list {folder}") from None

    def delete(self, name: str) -> None:
        check_name(name)
        try:
            self._ob.delete(self._store, name)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, f"delete {name}") from None
        self.stats.add("delete")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_store(location: str, **s3_options) -> BlobStore:
    """A store for ``location``: ``s3://bucket/prefix`` or a local directory."""
    if location.startswith("s3://"):
        store = S3Store(S3Location.parse(location, **s3_options))
        store.check()
        return store
    return LocalStore(location)
