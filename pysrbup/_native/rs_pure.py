"""Pure numpy twin of the ``_rs`` extension: systematic Reed-Solomon over GF(256).

A stripe is a ``(k, n)`` uint8 array: ``k`` data shards of ``n`` bytes. Its
``m`` parity shards are ``P . data`` over GF(256), so every byte column
``data[:, p]`` followed by ``parity[:, p]`` is exactly the codeword
``reedsolo.RSCodec(m)`` produces for that column (see :mod:`gf256` for the
matrices). Any ``m`` lost shards (data or parity) can be rebuilt from the
other ``k``.

The per-byte work is a GF(256) matrix product over whole rows: for each
coefficient a row gather from the 256-entry multiplication table, XORed into
the output row. This runs at a few hundred MB/s; the compiled kernel is the
fast path and is tested against this module and against ``reedsolo``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pysrbup._native import gf256

__all__ = ["MAX_SHARDS", "encode", "reconstruct"]

MAX_SHARDS = gf256.MAX_SHARDS


def _apply(coef: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
    """dst[r] = XOR over c of coef[r, c] * src[c], for 1-D uint8 rows."""
    for r, out in enumerate(dst):
        out[:] = 0
        for c, row in enumerate(src):
            a = int(coef[r, c])
            if a == 1:
                out ^= row
            elif a:
                out ^= gf256.MUL[a].take(row)


def encode(data: np.ndarray, m: int, out: np.ndarray | None = None) -> np.ndarray:
    """Computes the ``m`` parity shards of a stripe.

    Args:
        data: ``(k, n)`` uint8 array, one data shard per row (made
            C-contiguous if it is not).
        m: Number of parity shards; ``m >= 1`` and ``k + m <= 255``.
        out: Optional C-contiguous writable ``(m, n)`` uint8 array to fill
            (must not overlap ``data``).

    Returns:
        The ``(m, n)`` uint8 parity array (``out`` if given). Column ``p`` is
        ``reedsolo.RSCodec(m).encode(bytes(data[:, p]))[-m:]``.

    Raises:
        ValueError: Bad shape, dtype or ``k``/``m``.
    """
    data = gf256.check_data(data)
    k, n = data.shape
    coef = gf256.parity_matrix(k, m)
    out = gf256.check_out(out, (m, n))
    _apply(coef, list(data), list(out))
    return out


def reconstruct(
    shards: np.ndarray, missing: Iterable[int], k: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Rebuilds the data shards of a stripe with up to ``m`` lost rows.

    Args:
        shards: ``(k + m, n)`` uint8 array, data rows then parity rows; rows
            listed in ``missing`` may hold anything and are not read.
        missing: Indices of the lost rows (data or parity), at most ``m``.
        k: Number of data shards.
        out: Optional C-contiguous writable ``(k, n)`` uint8 array to fill.
            It may be ``shards[:k]`` itself to repair the stripe in place.

    Returns:
        The ``(k, n)`` uint8 data (``out`` if given).

    Raises:
        ValueError: Too many or invalid missing indices, bad shapes or ``k``.
    """
    shards, plan, out = gf256.prepare_reconstruct(shards, missing, k, out)
    _apply(plan.matrix, [shards[i] for i in plan.sources], [out[i] for i in plan.targets])
    return out
