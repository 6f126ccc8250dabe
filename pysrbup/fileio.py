"""Whole reads and writes on descriptors and readers that may return short counts."""

from __future__ import annotations

import os
from collections.abc import Callable


def pread_into(fd: int, view: memoryview, offset: int = 0) -> int:
    """Fills ``view`` from ``fd`` at ``offset`` with ``preadv`` (no seek, no file object);
    returns the bytes read, fewer only at end of file."""
    got = 0
    while got < len(view):
        count = os.preadv(fd, [view[got:]], offset + got)
        if not count:
            break
        got += count
    return got


def read_into(readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Fills ``view`` by calling ``readinto`` (a file's, a decompressor's) until it is
    full or the reader is exhausted; returns the bytes read."""
    got = 0
    while got < len(view):
        count = readinto(view[got:])
        if not count:
            break
        got += count
    return got


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is written."""
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
