# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled file creation for restore (see :mod:`fsops_pure` for the contract).

Same calls, order, results and errors as the pure twin, but all of one
file's system calls run in a single stretch with the GIL released, so the
restore's fetch and write threads do not hand the GIL over at every call.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
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

__all__ = ["create_file", "write_at"]

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


def create_file(int dir_fd, bytes name, data, long long size, int open_mode, int chmod_mode,
                long long uid, long long gid, long long mtime_ns):
    """Creates, fills and finishes one file; see :mod:`fsops_pure`."""
    cdef Py_buffer view
    cdef bint have_data = data is not None
    if b"\0" in name:
        raise ValueError("embedded null byte")
    cdef const char* path = name
    cdef int fd, err = 0, meta_err = 0
    cdef timespec times[2]
    times[0].tv_sec = mtime_ns // 1000000000
    times[0].tv_nsec = mtime_ns % 1000000000
    times[1] = times[0]
    if have_data:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            fd = openat(dir_fd, path, CREATE_FLAGS, <mode_t>open_mode)
            if fd < 0:
                err = errno
            else:
                if have_data:
                    err = _pwrite_all(fd, <const char*>view.buf, view.len, 0)
                elif ftruncate(fd, <off_t>size) < 0:
                    err = errno
                if not err:
                    if uid != -1 and fchown(fd, <uid_t>uid, <gid_t>gid) < 0:
                        meta_err = errno
                    elif chmod_mode != -1 and fchmod(fd, <mode_t>chmod_mode) < 0:
                        meta_err = errno
                    elif futimens(fd, times) < 0:
                        meta_err = errno
                close(fd)
    finally:
        if have_data:
            PyBuffer_Release(&view)
    if err:
        _raise(err)
    return meta_err


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
