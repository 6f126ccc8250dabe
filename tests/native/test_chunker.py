"""Tests of the FastCDC chunker: compiled kernel vs pure twin, streaming, golden pins."""

from __future__ import annotations

import array
import hashlib
import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysrbup import _native as native
from pysrbup._native import _chunker, chunker, chunker_pure
from pysrbup._native.gear import gear_table

# Two shared cores: keep property tests small and free of deadlines (local, not a
# global profile, so other test suites keep their own settings).
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMPLS = [pytest.param(_chunker, id="native"), pytest.param(chunker_pure, id="pure")]
SMALL = (2048, 8192, 32768)  # min/avg/max that keep the pure twin fast
GEAR = gear_table(b"pysrbup test seed")


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def stream_cuts(impl, gear, data: bytes, block: int, sizes) -> list[int]:
    """Feeds ``data`` in blocks of ``block`` bytes with the documented carry-over."""
    out: list[int] = []
    carry = b""
    base = 0
    if not data:
        return impl.cut_points(gear, b"", *sizes, True)
    for off in range(0, len(data), block):
        buf = carry + data[off : off + block]
        eof = off + block >= len(data)
        cuts = impl.cut_points(gear, buf, *sizes, eof)
        out.extend(base + c for c in cuts)
        last = cuts[-1] if cuts else 0
        carry = buf[last:]
        base += last
    assert not carry
    return out


def check_chunks(cuts: list[int], n: int, sizes, eof: bool = True) -> None:
    mn, _, mx = sizes
    prev = 0
    for i, c in enumerate(cuts):
        size = c - prev
        assert 0 < size <= mx
        if i < len(cuts) - 1 or not eof:
            assert size >= mn
        prev = c
    if eof:
        assert cuts[-1:] == ([n] if n else [])


def test_facade_exports():
    assert chunker.DEFAULT_MIN == 256 * 1024
    assert chunker.DEFAULT_AVG == 1024 * 1024
    assert chunker.DEFAULT_MAX == 4 * 1024 * 1024
    assert chunker.cut_points is _chunker.cut_points
    assert _chunker.API_VERSION == native.API_VERSION == 2
    for name in ("DEFAULT_MIN", "DEFAULT_AVG", "DEFAULT_MAX", "MAX_CHUNK_LIMIT"):
        assert getattr(_chunker, name) == getattr(chunker_pure, name)


def test_gear_table():
    a, b = gear_table(b"one"), gear_table(b"two")
    assert a.typecode == "Q" and a.itemsize == 8 and len(a) == 256
    assert a == gear_table(b"one")
    assert not any(x == y for x, y in zip(a, b, strict=True))
    assert len(set(a.tolist())) == 256
    # Pinned: the table is part of the repository format (it fixes chunk boundaries).
    digest = hashlib.sha256(gear_table(b"pysrbup golden seed").tobytes()).hexdigest()
    assert digest == "b3f331aa02ed1003d803c863103d8bc49206d6fdd880bd2424413eb49d3c08e8"


@pytest.mark.parametrize("sizes", [SMALL, (64, 256, 1024), (100, 4096, 5000), (1, 64, 65)])
@pytest.mark.parametrize("eof", [True, False])
def test_native_matches_pure(sizes, eof):
    for n, seed in ((0, 0), (1, 1), (sizes[0], 2), (sizes[2], 3), (300_000, 4)):
        data = rand_bytes(n, seed)
        want = chunker_pure.cut_points(GEAR, data, *sizes, eof)
        assert _chunker.cut_points(GEAR, data, *sizes, eof) == want
        if n:
            check_chunks(want, n, sizes, eof)


def test_native_matches_pure_default_sizes():
    data = rand_bytes(6 << 20, 5)
    args = (chunker.DEFAULT_MIN, chunker.DEFAULT_AVG, chunker.DEFAULT_MAX, True)
    want = chunker_pure.cut_points(GEAR, data, *args)
    assert _chunker.cut_points(GEAR, data, *args) == want
    check_chunks(want, len(data), args[:3])


def test_low_entropy_data_cuts_at_max():
    # A constant stream never satisfies the mask: every chunk is max_size.
    data = bytes(100_000)
    for impl in (_chunker, chunker_pure):
        cuts = impl.cut_points(GEAR, data, *SMALL, True)
        assert cuts == [*range(32768, 100_000, 32768), 100_000]


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_cases(impl):
    assert impl.cut_points(GEAR, b"", *SMALL, True) == []
    assert impl.cut_points(GEAR, b"", *SMALL, False) == []
    assert impl.cut_points(GEAR, b"x", *SMALL, True) == [1]
    assert impl.cut_points(GEAR, b"x", *SMALL, False) == []
    short = rand_bytes(2048)
    assert impl.cut_points(GEAR, short, *SMALL, True) == [2048]
    assert impl.cut_points(GEAR, short, *SMALL, False) == []
    # Exactly max_size without a cut point is a complete chunk even without eof.
    assert impl.cut_points(GEAR, bytes(32768), *SMALL, False) == [32768]
    assert impl.cut_points(GEAR, bytes(32767), *SMALL, False) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_non_eof_keeps_tail(impl):
    data = rand_bytes(200_000, 7)
    full = impl.cut_points(GEAR, data, *SMALL, True)
    partial = impl.cut_points(GEAR, data, *SMALL, False)
    assert partial == full[: len(partial)]
    assert len(partial) >= len(full) - 1
    assert len(data) - (partial[-1] if partial else 0) < SMALL[2] or full[-1] == len(data)


@pytest.mark.parametrize("impl", IMPLS)
def test_buffer_types(impl, tmp_path):
    data = rand_bytes(150_000, 8)
    want = impl.cut_points(GEAR, data, *SMALL, True)
    assert impl.cut_points(GEAR, bytearray(data), *SMALL, True) == want
    assert impl.cut_points(GEAR, memoryview(data), *SMALL, True) == want
    assert impl.cut_points(GEAR, np.frombuffer(data, np.uint8), *SMALL, True) == want
    # The gear table may be any buffer of 256 unsigned 64-bit words (numpy's too).
    assert impl.cut_points(np.frombuffer(GEAR.tobytes(), np.uint64), data, *SMALL, True) == want
    # Multi-byte item formats are read as raw bytes.
    assert impl.cut_points(GEAR, np.frombuffer(data, np.uint32), *SMALL, True) == want
    path = tmp_path / "f"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert impl.cut_points(GEAR, mm, *SMALL, True) == want
    # Offsets are relative to the start of the (sliced) buffer.
    sub = memoryview(data)[want[0] :]
    assert impl.cut_points(GEAR, sub, *SMALL, True) == [c - want[0] for c in want[1:]]
    with pytest.raises(BufferError):
        impl.cut_points(GEAR, memoryview(data)[::2], *SMALL, True)


@pytest.mark.parametrize("impl", IMPLS)
def test_validation(impl):
    data = b"abc"
    for bad in [(0, 64, 128), (64, 64, 128), (32, 128, 128), (8, 100, 200), (8, 32, 64)]:
        with pytest.raises(ValueError):
            impl.cut_points(GEAR, data, *bad, True)
    with pytest.raises(ValueError):
        impl.cut_points(GEAR, data, 8, 1 << 20, (1 << 30) + 1, True)
    with pytest.raises(ValueError):
        impl.cut_points(GEAR[:255], data, *SMALL, True)
    with pytest.raises(ValueError):
        impl.cut_points(array.array("q", range(256)), data, *SMALL, True)
    with pytest.raises(ValueError):
        impl.cut_points(GEAR.tobytes(), data, *SMALL, True)
    with pytest.raises(ValueError):
        impl.cut_points(None, data, *SMALL, True)
    with pytest.raises(TypeError):
        impl.cut_points(GEAR, "not a buffer", *SMALL, True)


@pytest.mark.parametrize("impl", IMPLS)
def test_seed_changes_boundaries(impl):
    data = rand_bytes(200_000, 9)
    a = impl.cut_points(gear_table(b"a"), data, *SMALL, True)
    b = impl.cut_points(gear_table(b"b"), data, *SMALL, True)
    assert a != b


@pytest.mark.parametrize("impl", IMPLS)
def test_insertion_resynchronises(impl):
    data = rand_bytes(300_000, 10)
    a = impl.cut_points(GEAR, data, *SMALL, True)
    b = impl.cut_points(GEAR, b"inserted!" + data, *SMALL, True)
    shared = {c + 9 for c in a} & set(b)
    assert len(shared) >= len(a) - 3


@pytest.mark.parametrize(
    ("impl", "block", "sizes", "n"),
    [
        pytest.param(chunker_pure, 1, (16, 64, 256), 12_000, id="pure-1"),
        pytest.param(chunker_pure, 7, (64, 256, 1024), 40_000, id="pure-7"),
        pytest.param(chunker_pure, 4097, SMALL, 300_000, id="pure-4097"),
        pytest.param(chunker_pure, 65_539, SMALL, 300_000, id="pure-65539"),
        pytest.param(_chunker, 1, (64, 256, 1024), 100_000, id="native-1"),
        pytest.param(_chunker, 7, (256, 1024, 4096), 300_000, id="native-7"),
        pytest.param(_chunker, 4097, SMALL, 1_000_000, id="native-4097"),
        pytest.param(_chunker, 1_000_003, (1 << 18, 1 << 20, 1 << 22), 12_000_000, id="native-1M"),
    ],
)
def test_streaming_equals_whole(impl, block, sizes, n):
    data = rand_bytes(n, block)
    whole = impl.cut_points(GEAR, data, *sizes, True)
    check_chunks(whole, n, sizes)
    assert stream_cuts(impl, GEAR, data, block, sizes) == whole


@SETTINGS
@given(
    data=st.binary(min_size=0, max_size=20_000),
    block=st.integers(min_value=1, max_value=5000),
    mn=st.integers(min_value=1, max_value=200),
    avg_bits=st.integers(min_value=8, max_value=11),
    extra=st.integers(min_value=1, max_value=3000),
)
def test_streaming_property(data, block, mn, avg_bits, extra):
    sizes = (mn, 1 << avg_bits, (1 << avg_bits) + extra)
    whole = _chunker.cut_points(GEAR, data, *sizes, True)
    assert stream_cuts(_chunker, GEAR, data, block, sizes) == whole
    if len(data) <= 5000:
        assert chunker_pure.cut_points(GEAR, data, *sizes, True) == whole


def _pin(cuts: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, cuts)).encode()).hexdigest()


# Golden pins: chunk boundaries are part of the repository format (dedup across
# versions depends on them). Optimisations of either twin must NOT change these.
@pytest.mark.parametrize("impl", IMPLS)
def test_golden_small(impl):
    data = np.random.default_rng(1234).bytes(256 << 10)
    cuts = impl.cut_points(gear_table(b"pysrbup golden seed"), data, *SMALL, True)
    assert len(cuts) == 28
    assert _pin(cuts) == "4eecd735407ee1eb2b0677f3bacaefc800b953ee78a5e4de0ace969e568684ba"


def test_golden_default_sizes():
    data = np.random.default_rng(1234).bytes(16 << 20)
    cuts = _chunker.cut_points(
        gear_table(b"pysrbup golden seed"),
        data,
        chunker.DEFAULT_MIN,
        chunker.DEFAULT_AVG,
        chunker.DEFAULT_MAX,
        True,
    )
    assert len(cuts) == 15
    assert _pin(cuts) == "ed596977f8d1f0232da7cd1874d3716c962b6a1795f44fb5ef532f01c614d9c5"
