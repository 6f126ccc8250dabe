"""A compact set of 32-byte object ids, for sets that grow with the repository.

A Python ``set`` of ids costs some 105 bytes an id (the bytes object, its
hash slot); the synced id set of a repository of ten million chunks would
take a gigabyte. ``IdSet`` keeps the ids sorted in one buffer beside their
first eight bytes as a numpy array, 40 bytes an id, and answers membership
by binary search (about a microsecond). It never changes after it is made,
so forked worker processes share its pages instead of copying them (a
set's pages are written by every reference count taken on its members).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from pysrbup.repo.wire import ID_SIZE


def _sorted_unique(blob) -> bytes:
    """The distinct ids of ``blob`` (concatenated ids), sorted by their bytes; a
    bytearray is sorted in place (one copy of the ids fewer at the peak)."""
    rows = np.frombuffer(blob, dtype=f"V{ID_SIZE}")  # void items sort as bytes do
    if rows.flags.writeable:
        rows.sort()
    else:
        rows = np.sort(rows)
    if len(rows) > 1:
        fresh = np.ones(len(rows), dtype=bool)
        fresh[1:] = rows[1:] != rows[:-1]
        if not fresh.all():
            rows = rows[fresh]
    return rows.tobytes()


def _sample(blob, count: int, unless: Callable[[bytes], bool]) -> list[bytes]:
    """Up to ``count`` distinct ids of ``blob`` (concatenated, repeats allowed) in random
    order, skipping those ``unless`` is true of."""
    chosen: dict[bytes, None] = {}
    order = np.random.default_rng(random.getrandbits(64)).permutation(len(blob) // ID_SIZE)
    for start in range(0, len(order), 65536):
        for at in order[start : start + 65536].tolist():
            oid = bytes(blob[at * ID_SIZE : (at + 1) * ID_SIZE])
            if oid not in chosen and not unless(oid):
                chosen[oid] = None
                if len(chosen) == count:
                    return list(chosen)
    return list(chosen)


class IdSet:
    """An immutable set of 32-byte ids (``in``, ``len``, iteration in sorted order)."""

    __slots__ = ("_blob", "_keys")

    def __init__(self, ids=b""):
        """``ids``: concatenated 32-byte ids (any order, repeats allowed; a bytearray
        is sorted in place)."""
        if len(ids) % ID_SIZE:
            raise ValueError(f"an id list must be a multiple of {ID_SIZE} bytes long")
        self._blob = _sorted_unique(ids)
        rows = np.frombuffer(self._blob, dtype=np.uint8).reshape(-1, ID_SIZE)
        self._keys = np.ascontiguousarray(rows[:, :8]).view(">u8").ravel().astype(np.uint64)

    @classmethod
    def of(cls, oids: Iterable[bytes]) -> IdSet:
        return cls(b"".join(oids))

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdSet) and self._blob == other._blob

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, oid) -> bool:
        if len(oid) != ID_SIZE or not self._blob:
            return False
        at = int(self._keys.searchsorted(np.uint64(int.from_bytes(oid[:8], "big"))))
        blob = self._blob
        end = len(blob)
        at *= ID_SIZE
        while at < end and blob[at : at + 8] == oid[:8]:  # equal prefixes: whole ids
            if blob[at : at + ID_SIZE] == oid:
                return True
            at += ID_SIZE
        return False

    def contains_many(self, oids: list[bytes]) -> list[bool]:
        """``[oid in self for oid in oids]``, with one vectorised search for all of them."""
        blob = self._blob
        if not oids or not blob:
            return [False] * len(oids)
        heads = np.frombuffer(b"".join(oid[:8].ljust(8, b"\0") for oid in oids), dtype=">u8")
        found = []
        end = len(blob)
        places = self._keys.searchsorted(heads.astype(np.uint64)).tolist()
        for oid, at in zip(oids, places, strict=True):
            at *= ID_SIZE
            hit = False
            while at < end and blob[at : at + 8] == oid[:8]:
                if blob[at : at + ID_SIZE] == oid:
                    hit = True
                    break
                at += ID_SIZE
            found.append(hit)
        return found

    def __iter__(self) -> Iterator[bytes]:
        blob = self._blob
        for at in range(0, len(blob), ID_SIZE):
            yield blob[at : at + ID_SIZE]

    def tobytes(self) -> bytes:
        """The ids, concatenated in sorted order."""
        return self._blob

    def without(self, oids: Iterable[bytes]) -> IdSet:
        """A copy without ``oids``."""
        drop = set(oids)
        return IdSet(b"".join(oid for oid in self if oid not in drop)) if drop else self

    def sample(self, count: int, unless: Callable[[bytes], bool] = lambda _: False) -> list[bytes]:
        """Up to ``count`` ids chosen at random, skipping those ``unless`` is true of."""
        return _sample(self._blob, count, unless)


class IdList:
    """Concatenated ids, repeats allowed, asked ``in`` rarely: the sorted set is made on
    the first ``in`` only (a backup's used ids, checked against condemnations, which are
    usually none), so most backups never pay for it."""

    __slots__ = ("_blob", "_set")

    def __init__(self, blob: bytearray):
        if len(blob) % ID_SIZE:
            raise ValueError(f"an id list must be a multiple of {ID_SIZE} bytes long")
        self._blob = blob
        self._set: IdSet | None = None

    def __contains__(self, oid) -> bool:
        if self._set is None:
            self._set = IdSet(self._blob)  # sorts the blob in place: the rows stay valid
        return oid in self._set

    def sample(self, count: int, unless: Callable[[bytes], bool] = lambda _: False) -> list[bytes]:
        """Up to ``count`` distinct ids chosen at random, skipping those ``unless`` is true of."""
        return _sample(self._blob, count, unless)
