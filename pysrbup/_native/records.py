"""Sorted fixed-width records facade: the compiled kernel or its pure-Python twin.

Import from here. :mod:`pysrbup._native.records_pure` documents the contract;
the client's id sets and files-cache index are built on it (no numpy there).
"""

from __future__ import annotations

from pysrbup._native import load

_impl = load("records")

sort_unique = _impl.sort_unique
find = _impl.find
find_many = _impl.find_many

__all__ = ["find", "find_many", "sort_unique", "sorted_rows"]


def sorted_rows(rows: bytearray, width: int, key_width: int) -> bytearray:
    """``rows`` sorted in place by ``sort_unique`` and cut to the rows it kept."""
    del rows[sort_unique(rows, width, key_width) * width :]
    return rows
