# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled FastCDC content-defined chunker (gear hash, normalised chunking).

Same public API and exactly the same cut points as :mod:`chunker_pure`, which
documents the algorithm. The byte scan runs over a raw pointer with the GIL
released, so several reader threads can chunk in parallel.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint64_t

API_VERSION = 2

# Defaults, limits and the parameter checks are shared with the pure twin.
from pysrbup._native.cdc_params import (  # noqa: F401 (re-exported)
    DEFAULT_AVG,
    DEFAULT_MAX,
    DEFAULT_MIN,
    MAX_CHUNK_LIMIT,
    gear_view as _gear_view,
    masks as _masks,
)

cdef enum:
    _BATCH = 512


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
    gview = _gear_view(gear)
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
