"""File creation for restore, pure Python: the twin of the compiled ``_fsops``.

Restoring a tree of small files is a handful of system calls per file
(create, write, owner, mode, times, close). Made one by one from Python, each
call releases and retakes the GIL, and with fetch and write threads running
that is a thread switch per call: on a 127,000-file tree, 600,000 futex calls
and a fifth of the CPU in the scheduler. The compiled kernel makes all of one
file's calls, and those of a whole batch of files, in a single stretch
without the GIL; this twin makes the same calls, in the same order, with the
same results and errors.

The contract (both backends):

``create_files(files)``
    Creates each file of ``files``, a list of tuples ``(dir_fd, name, data,
    size, open_mode, chmod_mode, uid, gid, mtime_ns)``, in turn: ``name`` in
    the directory ``dir_fd`` (``O_CREAT | O_EXCL | O_NOFOLLOW``, permissions
    ``open_mode`` less the umask), with all of ``data`` (a buffer) written at
    offset 0, or if ``data`` is None sized to ``size`` bytes (a hole); then
    its owner is set (unless ``uid`` is -1), its mode (unless ``chmod_mode``
    is -1) and its access and modification times (both ``mtime_ns``), and it
    is closed. Returns one int per file: 0; or the errno of the first
    metadata call that failed (the file exists with its data, the remaining
    metadata unset); or minus the errno when the file could not be created,
    written or sized. A failure stops only that file. A name holding a NUL
    byte raises ``ValueError`` before any file is made.

``write_at(dir_fd, name, data, offset)``
    Opens the existing file ``name`` in ``dir_fd`` (``O_WRONLY | O_NOFOLLOW``),
    writes all of ``data`` at ``offset`` and closes it; ``OSError`` on failure.
"""

from __future__ import annotations

import os

from pysrbup.fileio import pwrite_all

#: A new file: fails if anything (file, symlink, directory) already has the name.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: A file this restore created, for writing more of it.
WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC

__all__ = ["create_files", "write_at"]


def _create(dir_fd, name, data, size, open_mode, chmod_mode, uid, gid, mtime_ns) -> int:
    """One file of ``create_files``: its result."""
    try:
        fd = os.open(name, CREATE_FLAGS, open_mode, dir_fd=dir_fd)
    except OSError as exc:
        return -(exc.errno or 1)
    try:
        try:
            if data is not None:
                pwrite_all(fd, memoryview(data).cast("B"), 0)
            else:
                os.ftruncate(fd, size)
        except OSError as exc:
            return -(exc.errno or 1)
        try:
            if uid != -1:
                os.fchown(fd, uid, gid)
            if chmod_mode != -1:
                os.fchmod(fd, chmod_mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            return exc.errno or 1
        return 0
    finally:
        os.close(fd)


def create_files(files: list[tuple]) -> list[int]:
    """Creates, fills and finishes each file; see the module docstring for the contract."""
    if any(b"\0" in entry[1] for entry in files):
        raise ValueError("embedded null byte")
    return [_create(*entry) for entry in files]


def write_at(dir_fd: int, name: bytes, data, offset: int) -> None:
    """Writes ``data`` into the existing file ``name`` at ``offset``."""
    fd = os.open(name, WRITE_FLAGS, dir_fd=dir_fd)
    try:
        pwrite_all(fd, memoryview(data).cast("B"), offset)
    finally:
        os.close(fd)
