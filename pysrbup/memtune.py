"""glibc malloc tuning for a process that moves large buffers around.

By default glibc serves every allocation above 128 KiB (a threshold that
adapts up to 32 MiB) with a fresh ``mmap``, and gives freed heap memory back
to the kernel early. Every megabyte-sized chunk, compressed payload, envelope
or frame then lands on fresh pages, and on this class of machine a page fault
costs 4-5 µs per 4 KiB: copying 1 MiB into a fresh ``bytes`` runs at about
2 GB/s instead of about 10 GB/s into reused heap memory (measured with
``bytes(view)`` of 1 MiB slices). Raising the mmap and trim thresholds keeps
freed buffers in the heap for the next one. Peak memory stays bounded by the
pipelines' queues; a few arenas (``ARENA_MAX``) keep threads from each
holding on to their own free memory.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap kept per arena. Measured on the 976 MB compare set: 64 MiB with 4
#: arenas peaked at 237-246 MiB RSS, 8 MiB with 2 arenas at 198-201 MiB, as fast.
TRIM_THRESHOLD = 8 * 1024 * 1024
#: Every arena keeps its own free memory: a few arenas bound the retained total.
ARENA_MAX = 2
#: Restore receives frames of about 1 MiB (never above 1 MiB plus one chunk)
#: and holds only a few (``restore.INFLIGHT_BYTES``): kept in the heap, a
#: freed frame's pages serve the next one instead of being mapped afresh
#: (2,000 page faults per 8 MiB frame when each was its own mapping).
RESTORE_MMAP_THRESHOLD = 32 * 1024 * 1024
#: ... and the heap keeps that much free memory, about the frames in flight.
RESTORE_TRIM_THRESHOLD = 16 * 1024 * 1024
#: ... in one arena: restore's threads pass frames and buffers between them, and
#: each arena kept its own free share. Restoring the 976 MB compare set peaked at
#: 97-104 MiB with one arena against 107-110 MiB with two, as fast (interleaved).
RESTORE_ARENA_MAX = 1

_done = False


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD,
    trim_threshold: int = TRIM_THRESHOLD,
    arena_max: int = ARENA_MAX,
) -> bool:
    """Applies the thresholds once per process; False where glibc is not there."""
    global _done
    if _done:
        return True
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(None)  # the loaded libc (find_library would run ldconfig)
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
        ok = libc.mallopt(M_ARENA_MAX, arena_max) == 1 and ok
        _done = ok
    return _done
