"""FastCDC parameters shared by the chunker kernel and its pure twin.

Defaults, limits, the gear table's check and the normalised-chunking cut
masks are written once here;
``_chunker.pyx`` and ``chunker_pure.py`` both take them from this module, so
the two backends cannot disagree about what a valid parameter set is.
"""

from __future__ import annotations

#: Default minimum chunk size (bytes).
DEFAULT_MIN = 256 * 1024
#: Default target average chunk size (bytes, a power of two).
DEFAULT_AVG = 1024 * 1024
#: Default maximum chunk size (bytes).
DEFAULT_MAX = 4 * 1024 * 1024
#: Largest accepted ``max_size`` (chunk lengths must fit comfortably in 32 bits).
MAX_CHUNK_LIMIT = 1 << 30
#: FastCDC normalisation level: masks are log2(avg) +/- this many bits.
NORMALIZATION = 2


def top_mask(bits: int) -> int:
    """A 64-bit mask of the top ``bits`` bits."""
    return ((1 << bits) - 1) << (64 - bits)


def masks(min_size: int, avg_size: int, max_size: int) -> tuple[int, int]:
    """Validates the size parameters and returns ``(mask_s, mask_l)``."""
    for name, value in (("min_size", min_size), ("avg_size", avg_size), ("max_size", max_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= min_size < avg_size < max_size <= MAX_CHUNK_LIMIT:
        raise ValueError(
            f"chunk sizes must satisfy 1 <= min < avg < max <= {MAX_CHUNK_LIMIT}, "
            f"got min={min_size} avg={avg_size} max={max_size}"
        )
    if avg_size & (avg_size - 1) or avg_size < 64:
        raise ValueError(f"avg_size must be a power of two >= 64, got {avg_size}")
    bits = avg_size.bit_length() - 1
    return top_mask(bits + NORMALIZATION), top_mask(bits - NORMALIZATION)


#: struct formats of an unsigned 64-bit word in a buffer (array('Q'), numpy uint64).
_WORD_FORMATS = ("Q", "L", "<Q", "=Q", "<L", "=L")


def gear_view(gear) -> memoryview:
    """``gear`` as a memoryview of its 256 unsigned 64-bit words; ValueError otherwise."""
    try:
        view = memoryview(gear)
    except TypeError:
        raise ValueError(f"gear must be a buffer, not {type(gear).__name__}") from None
    if (
        view.ndim != 1
        or view.shape[0] != 256
        or view.format not in _WORD_FORMATS
        or view.itemsize != 8
    ):
        raise ValueError(
            f"gear must be 256 unsigned 64-bit words, got {view.shape[0] if view.ndim else 0}"
            f" of format {view.format!r}"
        )
    return view
