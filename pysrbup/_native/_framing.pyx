# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled framing of chunk-record batches (see :mod:`framing_pure` for the layout).

Same public API, results and error messages as the pure twin. Packing
acquires every input buffer once, sizes the frame, then copies all payloads
with the GIL released; unpacking parses over a raw pointer and hands out
memoryview slices of the input (zero copy).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from pysrbup._native.framing_errors import FrameError

API_VERSION = 2

MAGIC = b"PSF1"
HEADER_SIZE = 8
RECORD_OVERHEAD = 37
ID_SIZE = 32
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_COUNT = 0xFFFFFFFF

cdef enum:
    _HEADER = 8
    _OVERHEAD = 37
    _ID = 32
    _MAXPAY = 64 * 1024 * 1024

__all__ = [
    "HEADER_SIZE",
    "ID_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "RECORD_OVERHEAD",
    "FrameError",
    "pack_records",
    "unpack_records",
]


cdef inline uint32_t _ld32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (
        <uint32_t>p[3] << 24)


cdef inline void _st32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


def _byte_view(obj, what):
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.contiguous:
        raise BufferError(f"{what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


cdef int _acquire(obj, Py_buffer* view, Py_ssize_t index, str kind) except -1:
    """Gets a simple contiguous buffer, raising the pure twin's errors on failure."""
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except Exception:
        _byte_view(obj, f"record {index} {kind}")  # raises the matching TypeError/BufferError
        raise
    return 0


cdef class _Batch:
    """Acquired buffers of a record sequence, released on dealloc."""

    cdef Py_buffer* bufs
    cdef uint8_t* flags
    cdef Py_ssize_t count
    cdef Py_ssize_t size

    def __cinit__(self):
        self.bufs = NULL
        self.flags = NULL
        self.count = 0
        self.size = 0

    def __dealloc__(self):
        cdef Py_ssize_t j
        if self.bufs != NULL:
            # Unacquired entries are zeroed (obj == NULL): PyBuffer_Release skips them.
            for j in range(2 * self.count):
                PyBuffer_Release(&self.bufs[j])
            PyMem_Free(self.bufs)
        if self.flags != NULL:
            PyMem_Free(self.flags)

    cdef int load(self, records) except -1:
        cdef Py_ssize_t i, n
        cdef Py_buffer* b
        seq = records if isinstance(records, (list, tuple)) else list(records)
        n = len(seq)
        self.bufs = <Py_buffer*>PyMem_Calloc(2 * n + 1, sizeof(Py_buffer))
        self.flags = <uint8_t*>PyMem_Malloc(n + 1)
        if self.bufs == NULL or self.flags == NULL:
            raise MemoryError()
        self.count = n
        self.size = _HEADER
        for i in range(n):
            record = seq[i]
            if len(record) != 3:
                raise ValueError(f"record {i}: expected (id, flags, payload)")
            rid, fl, payload = record
            b = &self.bufs[2 * i]
            _acquire(rid, b, i, "id")
            if b.len != _ID:
                raise ValueError(f"record {i}: id must be {_ID} bytes, got {b.len}")
            if not isinstance(fl, int):
                raise TypeError(f"record {i}: flags must be an int")
            if not 0 <= fl <= 0xFF:
                raise ValueError(f"record {i}: flags {fl} outside [0, 255]")
            self.flags[i] = <uint8_t>fl
            b = &self.bufs[2 * i + 1]
            _acquire(payload, b, i, "payload")
            if b.len > _MAXPAY:
                raise ValueError(f"record {i}: payload of {b.len} bytes exceeds {_MAXPAY}")
            self.size += _OVERHEAD + b.len
        if n > MAX_COUNT:
            raise ValueError(f"too many records for one frame: {n}")
        return 0

    cdef void write(self, uint8_t* out) noexcept nogil:
        cdef Py_ssize_t i, pos = _HEADER, length
        memcpy(out, b"PSF1", 4)
        _st32(out + 4, <uint32_t>self.count)
        for i in range(self.count):
            memcpy(out + pos, self.bufs[2 * i].buf, _ID)
            out[pos + _ID] = self.flags[i]
            length = self.bufs[2 * i + 1].len
            _st32(out + pos + _ID + 1, <uint32_t>length)
            pos += _OVERHEAD
            if length:
                memcpy(out + pos, self.bufs[2 * i + 1].buf, length)
            pos += length


def pack_records(records):
    """Packs ``records`` into a new bytes frame (one allocation, one copy per payload).

    See :func:`pysrbup._native.framing_pure.pack_records`. The frame is ``bytes``
    (filled before anyone can see it), so gRPC sends it without another copy.
    """
    cdef _Batch batch = _Batch()
    cdef uint8_t* dst
    batch.load(records)
    out = PyBytes_FromStringAndSize(NULL, batch.size)
    dst = <uint8_t*>PyBytes_AS_STRING(out)
    with nogil:
        batch.write(dst)
    return out


def unpack_records(buf, max_payload=MAX_PAYLOAD, max_records=1_000_000):
    """Parses a frame into ``(id, flags, payload)`` tuples of memoryviews into ``buf``.

    See :func:`pysrbup._native.framing_pure.unpack_records`.
    """
    cdef Py_buffer pview
    cdef const uint8_t* p
    cdef Py_ssize_t n, pos, index, start
    cdef uint64_t count, length, limit_pay, limit_rec
    if max_payload < 0 or max_records < 0:
        raise ValueError("max_payload and max_records must be >= 0")
    limit_pay = min(max_payload, 0xFFFFFFFFFFFF)
    limit_rec = min(max_records, 0xFFFFFFFFFFFF)
    view = _byte_view(buf, "buf")
    PyObject_GetBuffer(view, &pview, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>pview.buf
        n = pview.len
        if n < _HEADER:
            raise FrameError(f"frame truncated: {n} bytes, header needs {_HEADER}")
        if memcmp(p, b"PSF1", 4) != 0:
            raise FrameError(f"bad frame magic {bytes(view[:4])!r}, expected {MAGIC!r}")
        count = _ld32(p + 4)
        if count > limit_rec:
            raise FrameError(f"frame claims {count} records, limit is {max_records}")
        if count * _OVERHEAD > <uint64_t>(n - _HEADER):
            raise FrameError(f"frame claims {count} records but has only {n} bytes")
        records = []
        pos = _HEADER
        for index in range(<Py_ssize_t>count):
            if n - pos < _OVERHEAD:
                raise FrameError(f"record {index}: truncated header at offset {pos}")
            length = _ld32(p + pos + _ID + 1)
            if length > limit_pay:
                raise FrameError(
                    f"record {index}: payload length {length} exceeds {max_payload}"
                )
            start = pos + _OVERHEAD
            if length > <uint64_t>(n - start):
                raise FrameError(
                    f"record {index}: payload of {length} bytes truncated at offset {start}"
                )
            records.append(
                (view[pos:pos + _ID], p[pos + _ID], view[start:start + <Py_ssize_t>length])
            )
            pos = start + <Py_ssize_t>length
        if pos != n:
            raise FrameError(f"{n - pos} trailing bytes after {count} records")
        return records
    finally:
        PyBuffer_Release(&pview)
