# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled FastCDC content-defined chunker (gear hash, normalised chunking).

Same public API and exactly the same cut points as :mod:`chunker_pure`, which
documents the algorithm. The byte scan runs over a raw pointer with the GIL
released, so several reader threads can chunk in parallel.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint64_t

import numpy as np

API_VERSION = 1

DEFAULT_MIN = 256 * 1024
DEFAULT_AVG = 1024 * 1024
DEFAULT_MAX = 4 * 1024 * 1024
MAX_CHUNK_LIMIT = 1 << 30

cdef enum:
    _BATCH = 512


cdef inline uint64_t _top_mask(int bits) noexcept nogil:
    return (((<uint64_t>1) << bits) - 1) << (64 - bits)


def _masks(min_size, avg_size, max_size):
    """Validates the size parameters and returns ``(mask_s, mask_l)``."""
    for name, value in (("min_size", min_size), ("avg_size", avg_size), ("max_size", max_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= min_size < avg_size < max_size <= MAX_CHUNK_LIMIT:
        raise ValueError(
            f"chunk sizes must satisfy 1 <= min < avg < max <= {MAX_CHUNK_LIMIT}, "
            f"got min={min_size} avg={avg_size} max={max_size}"
        )
    if avg_size & (avg_size - 1) or avg_size < 64:
        raise ValueError(f"avg_size must be a power of two >= 64, got {avg_size}")
    bits = avg_size.bit_length() - 1
    return _top_mask(bits + 2), _top_mask(bits - 2)


cdef Py_ssize_t _next_cut(
    const uint8_t* p,
    Py_ssize_t remaining,
    const uint64_t* g,
    Py_ssize_t min_size,
    Py_ssize_t avg_size,
    Py_ssize_t max_size,
    uint64_t mask_s,
    uint64_t mask_l,
    bint eof,
) noexcept nogil:
    """Length of the chunk starting at ``p``, or 0 if undecided (needs more data)."""
    cdef Py_ssize_t limit, normal, i
    cdef uint64_t h = 0
    if remaining <= min_size:
        return remaining if eof else 0
    limit = remaining if remaining < max_size else max_size
    normal = avg_size if avg_size < limit else limit
    i = min_size
    while i < normal:
        h = (h << 1) + g[p[i]]
        i += 1
        if not (h & mask_s):
            return i
    while i < limit:
        h = (h << 1) + g[p[i]]
        i += 1
        if not (h & mask_l):
            return i
    if limit == max_size or eof:
        return limit
    return 0


def cut_points(gear, buf, Py_ssize_t min_size, Py_ssize_t avg_size, Py_ssize_t max_size,
               bint eof):
    """Finds the content-defined chunk boundaries in ``buf``.

    See :func:`pysrbup._native.chunker_pure.cut_points` for the full contract.
    Returns the end offsets of every complete chunk, relative to ``buf``.
    """
    cdef uint64_t mask_s, mask_l
    cdef uint64_t table[256]
    cdef const uint64_t[::1] gview
    cdef Py_buffer view
    cdef const uint8_t* data
    cdef Py_ssize_t n, pos = 0, c, nb, k
    cdef Py_ssize_t batch[_BATCH]
    cdef bint done = False

    mask_s, mask_l = _masks(min_size, avg_size, max_size)
    arr = np.asarray(gear)
    if arr.dtype != np.uint64 or arr.shape != (256,):
        raise ValueError(
            f"gear must be a uint64 array of shape (256,), got {arr.dtype} {arr.shape}"
        )
    gview = np.ascontiguousarray(arr)
    for k in range(256):
        table[k] = gview[k]

    cuts = []
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        data = <const uint8_t*>view.buf
        n = view.len
        while not done:
            nb = 0
            with nogil:
                while nb < _BATCH:
                    c = _next_cut(data + pos, n - pos, table, min_size, avg_size, max_size,
                                  mask_s, mask_l, eof)
                    if c == 0:
                        done = True
                        break
                    pos += c
                    batch[nb] = pos
                    nb += 1
            for k in range(nb):
                cuts.append(batch[k])
    finally:
        PyBuffer_Release(&view)
    return cuts
