"""Reading, chunking and naming one file: the per-file stage of a backup.

``FileSaver`` turns a regular file (or a stream) into its chunk ids and
sizes. Every chunk is named with the keyed MAC; ``claim(oid)`` says whether
it is new (neither in the repository nor claimed by this backup), and new
chunks go to ``new_chunk(oid, data, block)``, which seals and stores them.
Small files (one read) pass ``block=None`` and are handled start to end by
the caller's thread; larger files are read into pooled blocks and each new
chunk is a view into one: the receiver releases the block when it is done
with the view (``Block.release``), so a block is reused, not reallocated,
and the pool bounds memory.

The same saver runs in the backup's worker processes (``workers.py``) and,
for ``backup --stdin``, in the main process.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from pysrbup._native import chunker
from pysrbup.fileio import pread_into
from pysrbup.repo import envelope

#: Read size of the block pipeline; a block also holds the carried tail (< max chunk).
READ_BYTES = 4 * 1024 * 1024
BLOCK_BYTES = READ_BYTES + chunker.DEFAULT_MAX
#: Files up to this size are read in one go and sealed by the thread that reads them.
SMALL_FILE = 1024 * 1024
#: Incompressibility check: this many 1 KiB slices, spread over the chunk, are
#: compressed first (~30 us); zstd runs on the chunk only if they shrink.
SAMPLE_SLICES = 32
SAMPLE_SLICE = 1024
SAMPLE_RATIO = 0.99
#: Zeros to fill the holes of sparse files with (one block's worth, shared): a
#: read-only anonymous map reads the kernel's zero page, which takes no memory.
_ZEROS = memoryview(mmap.mmap(-1, BLOCK_BYTES, prot=mmap.PROT_READ))
_LOCAL = threading.local()
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_EUID = os.geteuid()


def compressible(data) -> bool:
    """Whether zstd is worth running: compresses ``SAMPLE_SLICES`` small slices first."""
    size = len(data)
    if size < 4 * SAMPLE_SLICES * SAMPLE_SLICE:
        return True
    sampler = getattr(_LOCAL, "sampler", None)
    if sampler is None:
        sampler = _LOCAL.sampler = zstandard.ZstdCompressor(level=1)
    step = (size - SAMPLE_SLICE) // (SAMPLE_SLICES - 1)
    sample = b"".join(data[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES))
    return len(sampler.compress(sample)) < SAMPLE_RATIO * len(sample)


def seal(sealer: envelope.Sealer, oid: bytes, data) -> bytearray:
    """The envelope of a chunk, compressed only when a sample says it shrinks."""
    return sealer.seal(oid, data, compress=compressible(data))


class Block:
    """A reusable read buffer; chunks in flight hold references to it."""

    __slots__ = ("buf", "lock", "pool", "refs", "view")

    def __init__(self, pool: BlockPool):
        self.buf = bytearray(BLOCK_BYTES)
        self.view = memoryview(self.buf)
        self.pool = pool
        self.refs = 0

    def hold(self) -> None:
        with self.pool.lock:
            self.refs += 1

    def release(self) -> None:
        with self.pool.lock:
            self.refs -= 1
            free = self.refs == 0
        if free:
            self.pool.free.put(self)


class BlockPool:
    """At most ``limit`` blocks, made on demand and reused."""

    def __init__(self, limit: int):
        self.limit = max(2, limit)
        self.made = 0
        self.lock = threading.Lock()
        self.free: queue.LifoQueue[Block] = queue.LifoQueue()

    def get(self) -> Block:
        """A free block; allocates up to the limit, then waits for one."""
        try:
            block = self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                grow = self.made < self.limit
                self.made += grow
            block = Block(self) if grow else self.free.get()
        block.refs = 1
        return block


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


@dataclass
class SavedFile:
    """A file as read: its size, chunk ids and sizes, and its stat after the read."""

    size: int
    ids: list[bytes]
    sizes: list[int]
    stat: os.stat_result
    steady: bool  # unchanged while read (worth a files cache entry)


def open_to_read(path: str, st: os.stat_result) -> int:
    """Opens the file ``path`` (lstat ``st``) for reading: not followed, not blocking
    (a FIFO put in its place since the lstat is not waited on), without updating
    its access time where that is allowed. OSError if it cannot be opened."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if st.st_uid == _EUID or _EUID == 0:  # O_NOATIME needs ownership (or root)
        flags |= _O_NOATIME
    try:
        return os.open(path, flags)
    except PermissionError:
        if not flags & _O_NOATIME:
            raise
        return os.open(path, flags & ~_O_NOATIME)


class FileSaver:
    """Chunks files into named chunks; new ones go to ``new_chunk`` (see the module doc)."""

    def __init__(
        self,
        sealer: envelope.Sealer,
        gear,
        blocks: BlockPool,
        claim: Callable[[bytes], bool],
        new_chunk: Callable[[bytes, memoryview, Block | None], None],
        on_bytes: Callable[[int], None] = lambda count: None,
        check_failed: Callable[[], None] = lambda: None,
    ):
        self.object_id = sealer.object_id
        self.gear = gear
        self.sizes = (chunker.DEFAULT_MIN, chunker.DEFAULT_AVG, chunker.DEFAULT_MAX)
        self.blocks = blocks
        self.claim = claim
        self.new_chunk = new_chunk
        self.on_bytes = on_bytes
        self.check_failed = check_failed
        self._small = memoryview(bytearray(SMALL_FILE + 1))

    def save(
        self,
        path: str,
        st: os.stat_result,
        warn: Callable[[str], None],
        fd: int | None = None,
    ) -> SavedFile | None:
        """Reads ``path`` (not followed); None (after ``warn``) if it cannot be read.

        ``fd``: the file, opened already by ``open_to_read`` (and closed here).
        A file that changed while it was read is read once more; if it changes
        again it is stored as read, with a warning, and marked not steady.
        """
        if fd is None:
            try:
                fd = open_to_read(path, st)
            except OSError as exc:
                warn(f"cannot read {path}: {exc.strerror}")
                return None
        try:
            for _attempt in range(2):
                size = -1
                if st.st_size <= SMALL_FILE:  # one read, on the bare descriptor
                    size, ids, sizes = self.read_small(fd)
                if size < 0:
                    os.lseek(fd, 0, os.SEEK_SET)
                    with open(fd, "rb", buffering=0, closefd=False) as handle:
                        sparse = st.st_blocks * 512 < st.st_size  # has holes
                        size, ids, sizes = self.read_blocks(handle, sparse)
                after = os.fstat(fd)
                if (after.st_size, after.st_mtime_ns) == (size, st.st_mtime_ns):
                    return SavedFile(size, ids, sizes, st, True)
                st = after
            warn(f"{path} changed while it was read; stored as read")
            return SavedFile(size, ids, sizes, st, False)
        except OSError as exc:
            warn(f"error reading {path}: {exc.strerror}")
            return None
        finally:
            os.close(fd)

    def read_small(self, fd: int) -> tuple[int, list[bytes], list[int]]:
        """Reads a small file from its start with ``preadv`` (no file object, no seek);
        size -1 if it is bigger than ``SMALL_FILE`` now."""
        view = self._small
        filled = pread_into(fd, view)
        if filled > SMALL_FILE:  # grew since lstat: take the streaming path
            return -1, [], []
        data = view[:filled]
        if filled <= self.sizes[0]:  # no bigger than a minimum chunk: one chunk (or none)
            cuts = [filled] if filled else []
        else:
            cuts = chunker.cut_points(self.gear, data, *self.sizes, True)
        ids: list[bytes] = []
        sizes: list[int] = []
        start = 0
        for cut in cuts:
            chunk = data[start:cut]
            oid = self.object_id(chunk)
            if self.claim(oid):
                self.new_chunk(oid, chunk, None)
            ids.append(oid)
            sizes.append(cut - start)
            start = cut
        self.on_bytes(filled)
        return filled, ids, sizes

    def read_blocks(self, handle, sparse: bool = False) -> tuple[int, list[bytes], list[int]]:
        """Chunks a file (or stream) block by block; ``sparse``: holes are zero-filled."""
        block = self.blocks.get()
        filled = total = 0
        eof = False
        ids: list[bytes] = []
        sizes: list[int] = []
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
                cuts = chunker.cut_points(self.gear, view[:filled], *self.sizes, eof)
                start = 0
                for cut in cuts:
                    chunk = view[start:cut]
                    oid = self.object_id(chunk)
                    if self.claim(oid):
                        block.hold()
                        self.new_chunk(oid, chunk, block)
                    ids.append(oid)
                    sizes.append(cut - start)
                    start = cut
                total += start
                self.on_bytes(start)
                self.check_failed()
                if not eof:
                    nxt = self.blocks.get()
                    tail = filled - start
                    nxt.view[:tail] = view[start:filled]
                    block.release()
                    block, filled = nxt, tail
        finally:
            block.release()
        return total, ids, sizes
