"""Content-defined chunker facade: the compiled kernel or its pure-Python twin.

Import from here, not from ``_chunker``/``chunker_pure``: :func:`load` picks the
backend (compiled unless ``PYSRBUP_PURE_PYTHON=1``) and checks the build is
current. See :mod:`pysrbup._native.chunker_pure` for the algorithm and
:func:`cut_points` for the streaming contract.

Typical streaming use::

    carry = b""
    for block in blocks:
        buf = carry + block          # or readinto() a reusable buffer
        cuts = cut_points(gear, buf, DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX, eof=last)
        ...                          # chunks are buf[prev:cut]
        carry = buf[cuts[-1] if cuts else 0 :]
"""

from __future__ import annotations

from pysrbup._native import load
from pysrbup._native.gear import gear_table

_impl = load("chunker")

DEFAULT_MIN: int = _impl.DEFAULT_MIN
DEFAULT_AVG: int = _impl.DEFAULT_AVG
DEFAULT_MAX: int = _impl.DEFAULT_MAX
MAX_CHUNK_LIMIT: int = _impl.MAX_CHUNK_LIMIT
cut_points = _impl.cut_points

__all__ = [
    "DEFAULT_AVG",
    "DEFAULT_MAX",
    "DEFAULT_MIN",
    "MAX_CHUNK_LIMIT",
    "cut_points",
    "gear_table",
]
