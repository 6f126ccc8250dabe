"""IdSet against a Python set on random ids, shared prefixes and repeats included."""

from __future__ import annotations

import os
import random

import pytest

from pysrbup.client.idset import IdList, IdSet


def _ids(count: int, rng: random.Random, prefix: bytes = b"") -> list[bytes]:
    return [prefix + rng.randbytes(32 - len(prefix)) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_membership_matches_a_set(seed):
    rng = random.Random(seed)
    members = _ids(rng.randrange(0, 3000), rng) + _ids(20, rng, prefix=b"\x07" * 8)
    members += rng.sample(members, min(len(members), 50))  # repeats
    rng.shuffle(members)
    ids = IdSet(b"".join(members))
    expected = set(members)
    strangers = _ids(500, rng) + _ids(20, rng, prefix=b"\x07" * 8) + [b"\x07" * 32]
    queries = rng.sample(members, min(len(members), 500)) + strangers
    assert len(ids) == len(expected)
    assert [q in ids for q in queries] == [q in expected for q in queries]
    assert ids.contains_many(queries) == [q in expected for q in queries]
    assert list(ids) == sorted(expected)
    assert ids.tobytes() == b"".join(sorted(expected))


def test_short_and_empty_queries_are_absent():
    ids = IdSet(b"a" * 32)
    assert b"a" * 31 not in ids and b"" not in ids and b"a" * 33 not in ids
    assert ids.contains_many([b"a" * 8, b"a" * 32]) == [False, True]
    assert b"a" * 32 not in IdSet() and IdSet().contains_many([b"a" * 32]) == [False]
    with pytest.raises(ValueError):
        IdSet(b"x" * 33)


def test_without_and_sample():
    rng = random.Random(9)
    members = _ids(1000, rng)
    ids = IdSet.of(members)
    dropped = set(members[:100])
    smaller = ids.without(dropped)
    assert set(smaller) == set(members) - dropped
    picked = ids.sample(50, unless=dropped.__contains__)
    assert len(picked) == len(set(picked)) == 50
    assert not set(picked) & dropped and set(picked) <= set(members)
    assert set(ids.sample(5000)) == set(members)  # asks for more than there are
    assert smaller.sample(10, unless=lambda _: True) == []


def test_membership_is_exact_for_real_ids():
    members = [os.urandom(32) for _ in range(20000)]
    ids = IdSet(b"".join(members))
    assert all(m in ids for m in members[::97])
    assert not any(os.urandom(32) in ids for _ in range(2000))


def test_an_id_list_samples_distinct_ids_and_answers_membership():
    rng = random.Random(11)
    members = _ids(2000, rng)
    blob = bytearray(b"".join(members + members[:500]))  # repeats, as a backup gathers them
    ids = IdList(blob)
    skipped = set(members[:1000])
    picked = ids.sample(300, unless=skipped.__contains__)
    assert len(picked) == len(set(picked)) == 300 and not set(picked) & skipped
    assert set(ids.sample(10**6)) == set(members)  # each once, though repeated
    strangers = _ids(200, rng)
    assert all(m in ids for m in members[::7]) and not any(s in ids for s in strangers)
    assert set(ids.sample(10**6)) == set(members)  # still right once sorted for ``in``
    with pytest.raises(ValueError):
        IdList(bytearray(31))
