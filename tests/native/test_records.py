"""The sorted-records kernel against its pure twin and against Python's sort and bisect."""

from __future__ import annotations

import random

import pytest

from pysrbup._native import _records, records, records_pure

IMPLS = [pytest.param(_records, id="native"), pytest.param(records_pure, id="pure")]


def _rows(rng: random.Random, count: int, width: int, alphabet: bytes) -> list[bytes]:
    """Random rows over a small alphabet, so equal keys and equal rows are common."""
    return [bytes(rng.choice(alphabet) for _ in range(width)) for _ in range(count)]


def _expected(rows: list[bytes], key_width: int) -> list[bytes]:
    ordered = sorted(rows)
    return [
        r
        for i, r in enumerate(ordered)
        if i + 1 == len(ordered) or ordered[i + 1][:key_width] != r[:key_width]
    ]


def test_facade_picks_the_compiled_kernel():
    assert records.sort_unique is _records.sort_unique
    assert _records.API_VERSION == 2


@pytest.mark.parametrize("seed", range(30))
def test_native_matches_pure_and_python(seed):
    rng = random.Random(seed)
    width = rng.choice([1, 2, 8, 16, 32, 33])
    key_width = rng.randint(1, width)
    rows = _rows(
        rng, rng.choice([0, 1, 2, 7, 100, 2000]), width, b"\x00\x01\xff"[: rng.randint(1, 3)]
    )
    probes = _rows(rng, 50, rng.randint(1, width), b"\x00\x01\xff")
    probes += [r[:key_width] for r in _expected(rows, key_width)[:20]]
    outcomes = []
    for impl in (_records, records_pure):
        buf = bytearray(b"".join(rows))
        count = impl.sort_unique(buf, width, key_width)
        kept = [bytes(buf[i * width : (i + 1) * width]) for i in range(count)]
        assert kept == _expected(rows, key_width)
        table = bytes(buf[: count * width])  # the kept rows: what a caller searches
        places = [impl.find(table, width, p) for p in probes]
        for probe, at in zip(probes, places, strict=True):
            starts = [i for i, r in enumerate(kept) if r.startswith(probe)]
            assert at == (starts[0] if starts else -1)
        assert impl.find_many(table, width, probes) == [at >= 0 for at in places]
        outcomes.append((count, table, places))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("seed", range(6))
def test_bucketed_sort_matches_pure_on_skewed_and_spread_rows(seed):
    """Enough rows for the native bucket pass: few buckets, one bucket, all buckets."""
    rng = random.Random(100 + seed)
    width = [2, 3, 32, 33, 2, 40][seed]
    key_width = rng.randint(1, width)
    count = rng.choice([4096, 5000, 9000])
    shape = seed % 3
    if shape == 0:  # a small alphabet: a handful of buckets, many equal keys and rows
        rows = _rows(rng, count, width, b"\x00\x01\x7f\xff")
    elif shape == 1:  # one bucket holds everything (the heapsort's worst case)
        rows = [b"\xab\xcd" + rng.randbytes(width - 2) for _ in range(count)]
    else:  # spread over every bucket, with repeats
        rows = [rng.randbytes(width) for _ in range(count)]
        rows += rng.sample(rows, 300)
        rng.shuffle(rows)
    results = []
    for impl in (_records, records_pure):
        buf = bytearray(b"".join(rows))
        kept = impl.sort_unique(buf, width, key_width)
        results.append(bytes(buf[: kept * width]))
    assert results[0] == results[1] == b"".join(_expected(rows, key_width))


@pytest.mark.parametrize("impl", IMPLS)
def test_random_ids_sort_like_python(impl):
    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(5000)]
    buf = bytearray(b"".join(ids + ids[:100]))
    count = impl.sort_unique(buf, 32, 32)
    assert count == 5000 and bytes(buf[: count * 32]) == b"".join(sorted(ids))
    table = buf[: count * 32]
    assert all(impl.find(table, 32, i) >= 0 for i in ids[::50])
    assert impl.find(table, 32, rng.randbytes(32)) == -1
    assert impl.find(table, 32, b"") == -1 and impl.find(table, 32, b"x" * 33) == -1


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl):
    with pytest.raises(TypeError):
        impl.sort_unique(b"a" * 32, 32, 32)  # not writable
    with pytest.raises(ValueError):
        impl.sort_unique(bytearray(33), 32, 32)
    with pytest.raises(ValueError):
        impl.sort_unique(bytearray(32), 32, 0)
    with pytest.raises(ValueError):
        impl.find(b"a" * 33, 32, b"a")  # not whole records
    with pytest.raises(ValueError):
        impl.find_many(b"a" * 31, 32, [b"a"])
