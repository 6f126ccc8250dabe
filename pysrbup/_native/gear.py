"""Gear table derivation for the content-defined chunker.

The gear hash maps every byte value to a 64-bit random word. pysrbup derives
that table from a secret seed (a sub-key of the repository key) so chunk
boundaries depend on the key: the server, or anyone else, cannot match the
chunk sizes of a backup against those of known files.

The table is the first 2048 bytes of BLAKE3's extendable output in key
derivation mode (context string below) over the seed, read as 256
little-endian uint64 words. Changing the context or byte order changes every
chunk boundary of every repository, so both are fixed forever.
"""

from __future__ import annotations

import sys
from array import array

import blake3

#: BLAKE3 derive_key context; part of the on-disk format (chunk boundaries).
GEAR_CONTEXT = "pysrbup 2024-01 gear table v1"


def gear_table(seed: bytes) -> array:
    """Derives the 256-entry gear table for the chunker from a secret seed.

    Args:
        seed: Secret key material of any length (normally a 32-byte HKDF
            sub-key of the repository master key).

    Returns:
        An ``array('Q')`` of 256 native-endian words (no numpy: a backup's
        processes never import it). Equal seeds give equal tables; different
        seeds give unrelated tables.
    """
    if not isinstance(seed, (bytes, bytearray, memoryview)):
        raise TypeError(f"seed must be bytes-like, not {type(seed).__name__}")
    raw = blake3.blake3(bytes(seed), derive_key_context=GEAR_CONTEXT).digest(length=256 * 8)
    table = array("Q", raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table
