"""Sorted fixed-width records in one buffer: the pure-Python twin of ``_records``.

The client keeps sets that grow with the repository (object ids, the files
cache's path hashes) as fixed-width records sorted by their bytes in a single
buffer, a few dozen bytes a member instead of the hundred a ``set`` costs,
and finds members by binary search. Sorting here builds a list of ``bytes``
(some 70 bytes a record besides the buffer), which is why the compiled twin
sorts in place; results are identical.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

__all__ = ["find", "find_many", "sort_unique"]


def _check(buf: Any, width: int) -> memoryview:
    view = memoryview(buf).cast("B")
    if width < 1 or len(view) % width:
        raise ValueError(f"the buffer must hold whole records of {width} bytes")
    return view


def sort_unique(buf: Any, width: int, key_width: int) -> int:
    """Sorts the ``width``-byte records of the writable ``buf`` by their bytes.

    Of each run of records whose first ``key_width`` bytes are equal, only the
    last (the greatest) is kept; the kept records are moved to the front of
    ``buf`` and their count is returned (what follows them is unspecified).
    """
    view = _check(buf, width)
    if view.readonly:
        raise TypeError("sort_unique needs a writable buffer")
    if not 1 <= key_width <= width:
        raise ValueError(f"key_width must be within 1..{width}")
    rows = sorted(bytes(view[at : at + width]) for at in range(0, len(view), width))
    kept = [
        row
        for at, row in enumerate(rows)
        if at + 1 == len(rows) or rows[at + 1][:key_width] != row[:key_width]
    ]
    view[: len(kept) * width] = b"".join(kept)
    return len(kept)


def find(buf: Any, width: int, key: Any) -> int:
    """The index of the first of the (sorted) records of ``buf`` that starts with
    ``key`` (at most ``width`` bytes), or -1."""
    view = _check(buf, width)
    count = len(view) // width
    size = len(key)
    if not 0 < size <= width:
        return -1
    key = bytes(key)
    at = bisect_left(range(count), key, key=lambda i: bytes(view[i * width : i * width + size]))
    return at if at < count and view[at * width : at * width + size] == key else -1


def find_many(buf: Any, width: int, keys: list) -> list[bool]:
    """``[find(buf, width, key) >= 0 for key in keys]``."""
    return [find(buf, width, key) >= 0 for key in keys]
