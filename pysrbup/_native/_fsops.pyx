# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled file creation for restore (see :mod:`fsops_pure` for the contract).

Same calls, order, results and errors as the pure twin, but all the system
calls of a batch of files run in one stretch with the GIL released, so the
restore's fetch and write threads do not hand the GIL over at every call,
and one thread's files are written while another opens the next records.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport errno, EINTR
from posix.stat cimport fchmod, futimens
from posix.time cimport timespec
from posix.types cimport gid_t, mode_t, off_t, uid_t
from posix.unistd cimport close, fchown, ftruncate, pwrite

import os

cdef extern from "<fcntl.h>" nogil:
    int openat(int, const char *, int, ...)
    enum:
        O_WRONLY
        O_CREAT
        O_EXCL
        O_NOFOLLOW
        O_CLOEXEC

API_VERSION = 2

__all__ = ["create_files", "write_at"]

cdef int CREATE_FLAGS = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
cdef int WRITE_FLAGS = O_WRONLY | O_NOFOLLOW | O_CLOEXEC


cdef int _pwrite_all(int fd, const char* data, Py_ssize_t length, off_t offset) noexcept nogil:
    """Writes all of ``data``; 0, or the errno of the write that failed."""
    cdef Py_ssize_t done
    while length > 0:
        done = pwrite(fd, data, <size_t>length, offset)
        if done < 0:
            if errno == EINTR:
                continue
            return errno
        data += done
        length -= done
        offset += done
    return 0


cdef _raise(int err):
    raise OSError(err, os.strerror(err))


cdef struct _File:
    int dir_fd
    const char* name
    const char* data
    Py_ssize_t length
    bint has_data
    long long size
    int open_mode
    int chmod_mode
    long long uid
    long long gid
    timespec times[2]
    int result


cdef void _create(_File* f) noexcept nogil:
    """One file of ``create_files``; its result in ``f.result``."""
    cdef int fd = openat(f.dir_fd, f.name, CREATE_FLAGS, <mode_t>f.open_mode)
    cdef int err = 0
    f.result = 0
    if fd < 0:
        f.result = -errno
        return
    if f.has_data:
        err = _pwrite_all(fd, f.data, f.length, 0)
    elif ftruncate(fd, <off_t>f.size) < 0:
        err = errno
    if err:
        f.result = -err
    elif f.uid != -1 and fchown(fd, <uid_t>f.uid, <gid_t>f.gid) < 0:
        f.result = errno
    elif f.chmod_mode != -1 and fchmod(fd, <mode_t>f.chmod_mode) < 0:
        f.result = errno
    elif futimens(fd, f.times) < 0:
        f.result = errno
    close(fd)


def create_files(list files):
    """Creates, fills and finishes each file of ``files``; see :mod:`fsops_pure`."""
    cdef Py_ssize_t count = len(files), i, held = 0
    cdef _File* table
    cdef Py_buffer* views
    cdef long long mtime_ns
    cdef bytes name
    items = list(files)  # keeps every tuple (and so its name and data) alive
    for entry in items:
        if b"\0" in <bytes?>entry[1]:
            raise ValueError("embedded null byte")
    table = <_File*>PyMem_Malloc(max(count, 1) * sizeof(_File))
    views = <Py_buffer*>PyMem_Malloc(max(count, 1) * sizeof(Py_buffer))
    if table == NULL or views == NULL:
        PyMem_Free(table)
        PyMem_Free(views)
        raise MemoryError()
    try:
        for i in range(count):
            dir_fd, name, data, size, open_mode, chmod_mode, uid, gid, mtime_ns = items[i]
            table[i].dir_fd = dir_fd
            table[i].name = name
            table[i].has_data = data is not None
            if table[i].has_data:
                PyObject_GetBuffer(data, &views[held], PyBUF_SIMPLE)
                table[i].data = <const char*>views[held].buf
                table[i].length = views[held].len
                held += 1
            table[i].size = size
            table[i].open_mode = open_mode
            table[i].chmod_mode = chmod_mode
            table[i].uid = uid
            table[i].gid = gid
            table[i].times[0].tv_sec = mtime_ns // 1000000000
            table[i].times[0].tv_nsec = mtime_ns % 1000000000
            table[i].times[1] = table[i].times[0]
        with nogil:
            for i in range(count):
                _create(&table[i])
        return [table[i].result for i in range(count)]
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        PyMem_Free(table)
        PyMem_Free(views)


def write_at(int dir_fd, bytes name, data, long long offset):
    """Writes ``data`` into the existing file ``name`` at ``offset``; see :mod:`fsops_pure`."""
    cdef Py_buffer view
    if b"\0" in name:
        raise ValueError("embedded null byte")
    cdef const char* path = name
    cdef int fd, err = 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            fd = openat(dir_fd, path, WRITE_FLAGS)
            if fd < 0:
                err = errno
            else:
                err = _pwrite_all(fd, <const char*>view.buf, view.len, <off_t>offset)
                close(fd)
    finally:
        PyBuffer_Release(&view)
    if err:
        _raise(err)
