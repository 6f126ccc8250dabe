"""GF(2^8) arithmetic and Reed-Solomon matrices shared by both RS backends.

The field and code parameters are those of ``reedsolo``'s defaults: field
polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator alpha = 2, first
consecutive root alpha^0. With ``m`` parity symbols the generator polynomial
is g(x) = (x - alpha^0)(x - alpha^1)...(x - alpha^(m-1)); a message of ``k``
symbols (first symbol = highest degree) is encoded systematically by
appending the remainder of msg(x) * x^m divided by g(x).

That remainder is linear in the message, so pysrbup encodes with an ``m x k``
parity matrix ``P``: parity = P . data, computed over whole shards at once
(each byte column of a stripe is one codeword). Decoding erasures picks ``k``
surviving rows of the systematic generator matrix ``[I_k; P]`` (any ``k`` rows
of an RS code are independent), inverts that ``k x k`` matrix and multiplies.

Everything here is small (matrices of at most 255 x 255) and built with
numpy once, then cached; the per-byte work happens in the ``_rs`` kernel or
its numpy twin ``rs_pure``, which both take these tables.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

PRIM = 0x11D
GENERATOR = 2
FCR = 0
#: Largest codeword length (data + parity shards) over GF(256).
MAX_SHARDS = 255


def _build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= PRIM
    exp[255:510] = exp[:255]
    a = np.arange(256)
    mul = exp[(log[a][:, None] + log[a][None, :]) % 255].astype(np.uint8)
    mul[0, :] = 0
    mul[:, 0] = 0
    for t in (exp, log, mul):
        t.setflags(write=False)
    return exp, log, mul


#: EXP[i] = alpha^i for 0 <= i < 510 (doubled so sums of logs need no modulo).
#: LOG[x] = discrete log of x for x != 0 (LOG[0] is meaningless).
#: MUL[a, b] = a * b in GF(256), a (256, 256) uint8 table.
EXP, LOG, MUL = _build_tables()
#: INV[x] = multiplicative inverse of x (INV[0] = 0 by convention).
INV = np.array([0] + [int(EXP[255 - int(LOG[x])]) for x in range(1, 256)], dtype=np.uint8)
INV.setflags(write=False)


def mul(a: int, b: int) -> int:
    """Multiplies two field elements."""
    return int(MUL[a, b])


def generator_poly(m: int) -> list[int]:
    """Returns g(x) = prod_{i<m} (x - alpha^(i + FCR)), highest degree first (reedsolo's)."""
    g = [1]
    for i in range(m):
        root = int(EXP[(i + FCR) % 255])
        out = [*g, 0]
        for j, coef in enumerate(g):
            out[j + 1] ^= int(MUL[coef, root])
        g = out
    return g


def _check_km(k: int, m: int) -> None:
    if not (isinstance(k, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise TypeError("k and m must be ints")
    if k < 1 or m < 1 or k + m > MAX_SHARDS:
        raise ValueError(f"need k >= 1, m >= 1 and k + m <= {MAX_SHARDS}, got k={k} m={m}")


@functools.lru_cache(maxsize=256)
def parity_matrix(k: int, m: int) -> np.ndarray:
    """Returns the ``(m, k)`` matrix P with parity = P . data (reedsolo-compatible).

    Column ``j`` is the parity reedsolo appends to the unit message e_j: the
    remainder of x^(m + k - 1 - j) modulo g(x), highest degree first. It is
    computed by running reedsolo's synthetic division on all ``k`` unit
    messages at once.
    """
    _check_km(k, m)
    gen = np.array(generator_poly(m), dtype=np.uint8)
    work = np.zeros((k + m, k), dtype=np.uint8)  # column j = codeword of e_j
    work[np.arange(k), np.arange(k)] = 1
    for i in range(k):
        coef = work[i].copy()
        for j in range(1, m + 1):
            work[i + j] ^= MUL[gen[j], coef]
    parity = np.ascontiguousarray(work[k:])
    parity.setflags(write=False)
    return parity


def inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverts a square matrix over GF(256) by Gauss-Jordan elimination.

    Raises:
        ValueError: The matrix is singular or not square.
    """
    a = np.array(matrix, dtype=np.uint8)
    n = a.shape[0]
    if a.ndim != 2 or a.shape[1] != n:
        raise ValueError(f"need a square matrix, got shape {a.shape}")
    aug = np.concatenate([a, np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        pivots = np.nonzero(aug[col:, col])[0]
        if not len(pivots):
            raise ValueError("matrix is singular over GF(256)")
        piv = col + int(pivots[0])
        if piv != col:
            aug[[col, piv]] = aug[[piv, col]]
        aug[col] = MUL[INV[aug[col, col]], aug[col]]
        factors = aug[:, col].copy()
        factors[col] = 0
        rows = np.nonzero(factors)[0]
        if len(rows):
            aug[rows] ^= MUL[factors[rows][:, None], aug[col][None, :]]
    return np.ascontiguousarray(aug[:, n:])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Small-matrix product over GF(256) (for building decode matrices)."""
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    for i in range(a.shape[1]):
        out ^= MUL[a[:, i][:, None], b[i][None, :]]
    return out


class DecodePlan(NamedTuple):
    """How to rebuild lost data rows from surviving shards.

    Attributes:
        sources: The ``k`` surviving shard rows to read, ascending.
        targets: The lost data rows (indices < k) to rebuild, ascending.
        matrix: ``(len(targets), k)`` coefficients: row t of the output is
            sum_c matrix[t, c] * shards[sources[c]].
    """

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    matrix: np.ndarray


def normalize_missing(missing: Iterable[int], k: int, m: int) -> tuple[int, ...]:
    """Validates lost row indices: unique, in range, at most ``m`` of them."""
    _check_km(k, m)
    try:
        rows = [int(i) for i in missing]
    except TypeError:
        raise TypeError("missing must be an iterable of row indices") from None
    lost = tuple(sorted(set(rows)))
    if len(lost) != len(rows):
        raise ValueError(f"duplicate indices in missing: {rows}")
    if lost and (lost[0] < 0 or lost[-1] >= k + m):
        raise ValueError(f"missing indices must be in [0, {k + m}), got {rows}")
    if len(lost) > m:
        raise ValueError(f"{len(lost)} shards missing, RS({k},{m}) can rebuild at most {m}")
    return lost


@functools.lru_cache(maxsize=1024)
def decode_plan(k: int, m: int, lost: tuple[int, ...]) -> DecodePlan:
    """Builds (and caches) the plan for a normalised tuple of lost rows."""
    lost_set = set(lost)
    sources = tuple(i for i in range(k + m) if i not in lost_set)[:k]
    targets = tuple(i for i in lost if i < k)
    if not targets:
        return DecodePlan(sources, targets, np.zeros((0, k), dtype=np.uint8))
    gen = np.concatenate([np.eye(k, dtype=np.uint8), parity_matrix(k, m)])
    dec = inverse(gen[list(sources)])
    matrix = np.ascontiguousarray(dec[list(targets)])
    matrix.setflags(write=False)
    return DecodePlan(sources, targets, matrix)


def check_data(data: np.ndarray, what: str = "data") -> np.ndarray:
    """Checks a 2-D uint8 array and returns it C-contiguous (a copy only if needed)."""
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, not {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{what} must be a 2-D uint8 array, got {data.dtype} {data.shape}")
    return np.ascontiguousarray(data)


def check_out(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Returns ``out`` after checking it can receive a result of ``shape``, or a new array."""
    if out is None:
        return np.empty(shape, dtype=np.uint8)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != shape:
        raise ValueError(f"out must be a uint8 array of shape {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writable")
    return out


def prepare_reconstruct(
    shards: np.ndarray, missing: Iterable[int], k: int, out: np.ndarray | None
) -> tuple[np.ndarray, DecodePlan, np.ndarray]:
    """Checks a reconstruct call and copies the surviving data rows into ``out``.

    Both twins share this; what is left for each is applying ``plan.matrix``
    to rows ``plan.sources`` of the shards into rows ``plan.targets`` of out.
    """
    shards = check_data(shards, "shards")
    total, n = shards.shape
    if not isinstance(k, (int, np.integer)) or not 1 <= k < total:
        raise ValueError(f"k must be an int in [1, {total}) for {total} shards, got {k!r}")
    lost = normalize_missing(missing, k, total - k)
    plan = decode_plan(k, total - k, lost)
    out = check_out(out, (k, n))
    lost_set = set(lost)
    for i in range(k):
        if i not in lost_set and not np.shares_memory(out[i], shards[i]):
            out[i] = shards[i]
    return shards, plan, out
