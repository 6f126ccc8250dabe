# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled sorted fixed-width records (see :mod:`records_pure` for the contract).

Same public API and results as the pure twin. Sorting is in place with the
GIL released: no copy of the records and no Python object per record, so a
set of ten million ids costs its 320 MB (and 1 MiB of counters) while it is
made. Records are first moved into 65,536 buckets by their first two bytes
(an in-place American-flag pass: ids are keyed MACs, so the buckets are small),
then each bucket is heapsorted; a skewed input (one bucket holds all) still
sorts in O(n log n). Searches are binary searches with ``memcmp``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcmp, memcpy

API_VERSION = 2

__all__ = ["find", "find_many", "sort_unique"]


cdef inline void _swap(char* a, char* b, char* tmp, Py_ssize_t width) noexcept nogil:
    memcpy(tmp, a, width)
    memcpy(a, b, width)
    memcpy(b, tmp, width)


cdef void _sift_down(char* base, Py_ssize_t start, Py_ssize_t end, Py_ssize_t width,
                     char* tmp) noexcept nogil:
    """Restores the max-heap below ``start`` within records [0, end)."""
    cdef Py_ssize_t root = start, child
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and memcmp(base + child * width, base + (child + 1) * width,
                                      width) < 0:
            child += 1
        if memcmp(base + root * width, base + child * width, width) >= 0:
            return
        _swap(base + root * width, base + child * width, tmp, width)
        root = child


cdef void _heapsort(char* base, Py_ssize_t count, Py_ssize_t width, char* tmp) noexcept nogil:
    cdef Py_ssize_t start, end
    if count < 2:
        return
    start = count // 2
    while start > 0:
        start -= 1
        _sift_down(base, start, count, width, tmp)
    end = count - 1
    while end > 0:
        _swap(base, base + end * width, tmp, width)
        _sift_down(base, 0, end, width, tmp)
        end -= 1


cdef enum:
    # Buckets of the first pass: one per value of a record's first two bytes.
    BUCKETS = 65536
    # Fewer records than this are heapsorted at once (the counters would cost more).
    BUCKET_MIN_RECORDS = 4096


cdef inline Py_ssize_t _bucket(const char* record) noexcept nogil:
    return ((<const unsigned char*>record)[0] << 8) | (<const unsigned char*>record)[1]


cdef void _bucket_sort(char* base, Py_ssize_t count, Py_ssize_t width, char* tmp,
                       Py_ssize_t* starts, Py_ssize_t* nexts) noexcept nogil:
    """Sorts records of at least two bytes: buckets by their first two bytes, then heapsort.

    ``starts`` holds BUCKETS + 1 counters, ``nexts`` BUCKETS.
    """
    cdef Py_ssize_t i, b, d, end
    for b in range(BUCKETS + 1):
        starts[b] = 0
    for i in range(count):
        starts[_bucket(base + i * width) + 1] += 1
    for b in range(BUCKETS):
        starts[b + 1] += starts[b]
        nexts[b] = starts[b]
    # Every bucket below ``b`` is complete, so a record met in bucket ``b``'s
    # region that belongs elsewhere belongs to a later bucket: swap it there.
    for b in range(BUCKETS):
        end = starts[b + 1]
        while nexts[b] < end:
            i = nexts[b]
            d = _bucket(base + i * width)
            if d == b:
                nexts[b] = i + 1
            else:
                _swap(base + i * width, base + nexts[d] * width, tmp, width)
                nexts[d] += 1
    for b in range(BUCKETS):
        _heapsort(base + starts[b] * width, starts[b + 1] - starts[b], width, tmp)


cdef Py_ssize_t _keep_last(char* base, Py_ssize_t count, Py_ssize_t width,
                           Py_ssize_t key_width) noexcept nogil:
    """Moves the last record of every run of equal keys to the front; their count."""
    cdef Py_ssize_t i, kept = 0
    for i in range(count):
        if i + 1 < count and memcmp(base + i * width, base + (i + 1) * width, key_width) == 0:
            continue
        if kept != i:
            memcpy(base + kept * width, base + i * width, width)
        kept += 1
    return kept


def sort_unique(buf, Py_ssize_t width, Py_ssize_t key_width):
    """Sorts the records of ``buf`` in place, keeps the last of equal keys; their count."""
    cdef Py_buffer view
    cdef Py_ssize_t count, kept
    cdef char* tmp = NULL
    cdef Py_ssize_t* starts = NULL
    cdef bint bucketed
    if width < 1:
        raise ValueError(f"the buffer must hold whole records of {width} bytes")
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    except BufferError:
        raise TypeError("sort_unique needs a writable buffer") from None
    try:
        if view.len % width:
            raise ValueError(f"the buffer must hold whole records of {width} bytes")
        if not 1 <= key_width <= width:
            raise ValueError(f"key_width must be within 1..{width}")
        count = view.len // width
        bucketed = width >= 2 and count >= BUCKET_MIN_RECORDS
        tmp = <char*>PyMem_Malloc(width)
        if bucketed:
            starts = <Py_ssize_t*>PyMem_Malloc((2 * BUCKETS + 1) * sizeof(Py_ssize_t))
        if tmp == NULL or (bucketed and starts == NULL):
            PyMem_Free(tmp)
            PyMem_Free(starts)
            raise MemoryError()
        with nogil:
            if bucketed:
                _bucket_sort(<char*>view.buf, count, width, tmp, starts, starts + BUCKETS + 1)
            else:
                _heapsort(<char*>view.buf, count, width, tmp)
            kept = _keep_last(<char*>view.buf, count, width, key_width)
        PyMem_Free(tmp)
        PyMem_Free(starts)
        return kept
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _lower_bound(const char* base, Py_ssize_t count, Py_ssize_t width,
                             const char* key, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t low = 0, high = count, mid
    while low < high:
        mid = (low + high) // 2
        if memcmp(base + mid * width, key, size) < 0:
            low = mid + 1
        else:
            high = mid
    if low < count and memcmp(base + low * width, key, size) == 0:
        return low
    return -1


cdef Py_ssize_t _open(buf, Py_buffer* view, Py_ssize_t width) except -1:
    """Acquires ``buf``; the number of records it holds."""
    PyObject_GetBuffer(buf, view, PyBUF_SIMPLE)
    if width < 1 or view.len % width:
        PyBuffer_Release(view)
        raise ValueError(f"the buffer must hold whole records of {width} bytes")
    return view.len // width


def find(buf, Py_ssize_t width, key):
    """Index of the first of the sorted records starting with ``key``, or -1."""
    cdef Py_buffer view, probe
    cdef Py_ssize_t at = -1
    cdef Py_ssize_t count = _open(buf, &view, width)
    try:
        PyObject_GetBuffer(key, &probe, PyBUF_SIMPLE)
        if 0 < probe.len <= width:
            at = _lower_bound(<const char*>view.buf, count, width,
                              <const char*>probe.buf, probe.len)
        PyBuffer_Release(&probe)
    finally:
        PyBuffer_Release(&view)
    return at


def find_many(buf, Py_ssize_t width, list keys):
    """``[find(buf, width, key) >= 0 for key in keys]``."""
    cdef Py_buffer view, probe
    cdef bint hit
    cdef Py_ssize_t count = _open(buf, &view, width)
    found = []
    try:
        for key in keys:
            PyObject_GetBuffer(key, &probe, PyBUF_SIMPLE)
            hit = 0 < probe.len <= width and _lower_bound(
                <const char*>view.buf, count, width, <const char*>probe.buf, probe.len) >= 0
            PyBuffer_Release(&probe)
            found.append(hit)
    finally:
        PyBuffer_Release(&view)
    return found
