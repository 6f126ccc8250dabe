"""Record-batch framing facade: the compiled kernel or its pure-Python twin.

Import from here. :mod:`pysrbup._native.framing_pure` documents the frame
layout byte by byte; both backends share :class:`FrameError`.
"""

from __future__ import annotations

from pysrbup._native import load
from pysrbup._native.framing_errors import FrameError

_impl = load("framing")

MAGIC: bytes = _impl.MAGIC
HEADER_SIZE: int = _impl.HEADER_SIZE
RECORD_OVERHEAD: int = _impl.RECORD_OVERHEAD
ID_SIZE: int = _impl.ID_SIZE
MAX_PAYLOAD: int = _impl.MAX_PAYLOAD
pack_records = _impl.pack_records
unpack_records = _impl.unpack_records

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
