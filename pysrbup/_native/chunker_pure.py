"""Pure-Python twin of the ``_chunker`` extension: FastCDC content-defined chunking.

This is the readable reference the compiled kernel is tested against, and the
fallback when ``PYSRBUP_PURE_PYTHON=1``. It is slow (a few MB/s): use it for
tests and debugging, never for real backups.

Algorithm (FastCDC with normalised chunking, level 2):

* The gear hash is ``h = (h << 1) + gear[byte]`` modulo 2**64, reset to 0 at
  every chunk start. Bit ``i`` of ``h`` depends only on the last ``i + 1``
  bytes, so the top bits see a 64-byte sliding window; the cut masks select
  the top bits.
* The first ``min_size`` bytes of a chunk are skipped (not hashed).
* Below ``avg_size`` a cut needs ``log2(avg) + 2`` zero top bits (``mask_s``,
  rarer cuts), from ``avg_size`` on only ``log2(avg) - 2`` (``mask_l``, more
  frequent), which pulls chunk sizes towards the average.
* A chunk is cut after the byte whose hash has all mask bits zero, or at
  ``max_size`` bytes.

Boundaries therefore depend only on the bytes since the chunk start, which
lets callers feed a stream block by block: keep the bytes after the last
returned cut point and prepend them to the next block.
"""

from __future__ import annotations

from typing import Any

from pysrbup._native.cdc_params import (  # noqa: F401 (the kernel's public constants)
    DEFAULT_AVG,
    DEFAULT_MAX,
    DEFAULT_MIN,
    MAX_CHUNK_LIMIT,
    gear_view,
)
from pysrbup._native.cdc_params import masks as _masks

_M64 = (1 << 64) - 1


def _gear_list(gear: Any) -> list[int]:
    return gear_view(gear).tolist()


def _as_bytes_view(buf: Any) -> memoryview:
    view = memoryview(buf)
    if not view.contiguous:
        raise BufferError("buf must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def cut_points(
    gear: Any, buf: Any, min_size: int, avg_size: int, max_size: int, eof: bool
) -> list[int]:
    """Finds the content-defined chunk boundaries in ``buf``.

    Args:
        gear: The gear table, a buffer of 256 unsigned 64-bit words (see
            :func:`pysrbup._native.gear.gear_table`).
        buf: Any contiguous buffer (bytes, bytearray, memoryview, mmap,
            numpy array); it is read in place, never copied.
        min_size: Minimum chunk length; ``1 <= min_size < avg_size``.
        avg_size: Target average chunk length, a power of two >= 64.
        max_size: Maximum chunk length; ``avg_size < max_size <= 2**30``.
        eof: True when ``buf`` ends the stream. If False, a trailing region
            without a cut point that is shorter than ``max_size`` is not
            reported: the caller carries it over into the next call.

    Returns:
        The end offsets (relative to the start of ``buf``, strictly
        increasing) of every complete chunk, scanning from offset 0. When
        ``eof`` is True and ``buf`` is not empty, the last one is ``len(buf)``.

    Raises:
        ValueError: Invalid sizes or gear table.
        BufferError: ``buf`` is not contiguous.
    """
    mask_s, mask_l = _masks(min_size, avg_size, max_size)
    g = _gear_list(gear)
    view = _as_bytes_view(buf)
    n = len(view)
    cuts: list[int] = []
    start = 0
    while start < n:
        remaining = n - start
        if remaining <= min_size:
            if eof:
                cuts.append(n)
            break
        limit = min(remaining, max_size)
        normal = min(avg_size, limit)
        h = 0
        cut = 0
        i = start + min_size
        for byte in view[i : start + normal]:
            h = ((h << 1) + g[byte]) & _M64
            i += 1
            if not h & mask_s:
                cut = i
                break
        if not cut:
            for byte in view[i : start + limit]:
                h = ((h << 1) + g[byte]) & _M64
                i += 1
                if not h & mask_l:
                    cut = i
                    break
        if not cut:
            if limit == max_size or eof:
                cut = start + limit
            else:
                break
        cuts.append(cut)
        start = cut
    return cuts
