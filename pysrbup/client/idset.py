"""A compact set of 32-byte object ids, for sets that grow with the repository.

A Python ``set`` of ids costs some 105 bytes an id (the bytes object, its
hash slot); the synced id set of a repository of ten million chunks would
take a gigabyte. ``IdSet`` keeps the ids sorted in one buffer, 32 bytes an
id, sorted in place and searched by the ``records`` kernel (binary search
with ``memcmp``, a fraction of a microsecond). It never changes after it is
made, so forked worker processes share its pages instead of copying them (a
set's pages are written by every reference count taken on its members).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator

from pysrbup._native import records
from pysrbup.repo.wire import ID_SIZE


def _sorted_unique(blob) -> bytearray:
    """The distinct ids of ``blob`` (concatenated ids), sorted by their bytes; a
    bytearray is sorted in place (one copy of the ids fewer at the peak)."""
    rows = blob if isinstance(blob, bytearray) else bytearray(blob)
    return records.sorted_rows(rows, ID_SIZE, ID_SIZE)


def _sample(blob, count: int, unless: Callable[[bytes], bool]) -> list[bytes]:
    """Up to ``count`` distinct ids of ``blob`` (concatenated, repeats allowed) in random
    order, skipping those ``unless`` is true of.

    Visits the ids along a random stride (start and step drawn at random, the step
    prime to their number): every id once, spread over the whole list, in constant
    memory however many there are.
    """
    total = len(blob) // ID_SIZE
    chosen: dict[bytes, None] = {}
    if not total or count <= 0:
        return []
    step = random.randrange(1, total) if total > 1 else 1
    while math.gcd(step, total) != 1:
        step = random.randrange(1, total)
    at = random.randrange(total)
    for _ in range(total):
        oid = bytes(blob[at * ID_SIZE : (at + 1) * ID_SIZE])
        if oid not in chosen and not unless(oid):
            chosen[oid] = None
            if len(chosen) == count:
                break
        at = (at + step) % total
    return list(chosen)


class IdSet:
    """An immutable set of 32-byte ids (``in``, ``len``, iteration in sorted order)."""

    __slots__ = ("_blob",)

    def __init__(self, ids=b""):
        """``ids``: concatenated 32-byte ids (any order, repeats allowed; a bytearray
        is sorted in place)."""
        if len(ids) % ID_SIZE:
            raise ValueError(f"an id list must be a multiple of {ID_SIZE} bytes long")
        self._blob = _sorted_unique(ids)

    @classmethod
    def of(cls, oids: Iterable[bytes]) -> IdSet:
        return cls(b"".join(oids))

    def __len__(self) -> int:
        return len(self._blob) // ID_SIZE

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdSet) and self._blob == other._blob

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, oid) -> bool:
        return len(oid) == ID_SIZE and records.find(self._blob, ID_SIZE, oid) >= 0

    def contains_many(self, oids: list[bytes]) -> list[bool]:
        """``[oid in self for oid in oids]``, in one call into the kernel."""
        found = records.find_many(self._blob, ID_SIZE, oids)
        return [hit and len(oid) == ID_SIZE for hit, oid in zip(found, oids, strict=True)]

    def __iter__(self) -> Iterator[bytes]:
        blob = self._blob
        for at in range(0, len(blob), ID_SIZE):
            yield bytes(blob[at : at + ID_SIZE])

    def tobytes(self) -> bytes:
        """The ids, concatenated in sorted order."""
        return bytes(self._blob)

    def view(self) -> memoryview:
        """The ids, concatenated in sorted order, without a copy (read-only)."""
        return memoryview(self._blob).toreadonly()

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
