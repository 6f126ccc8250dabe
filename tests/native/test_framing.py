"""Tests of record-batch framing: compiled vs pure, round trips, hostile input, golden pin."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysrbup import _native as native
from pysrbup._native import _framing, framing, framing_pure
from pysrbup._native.framing_errors import FrameError

# Two shared cores: keep property tests small and free of deadlines (local, not a
# global profile, so other test suites keep their own settings).
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMPLS = [pytest.param(_framing, id="native"), pytest.param(framing_pure, id="pure")]


def random_records(rng: random.Random, count: int, max_len: int = 5000):
    return [
        (rng.randbytes(32), rng.randrange(256), rng.randbytes(rng.randrange(max_len + 1)))
        for _ in range(count)
    ]


def as_bytes(records):
    return [(bytes(i), f, bytes(p)) for i, f, p in records]


def outcome(impl, data: bytes, **kwargs):
    try:
        return ("ok", as_bytes(impl.unpack_records(data, **kwargs)))
    except FrameError as exc:
        return ("error", str(exc))


def test_api_and_shared_error():
    for name in ("MAGIC", "HEADER_SIZE", "RECORD_OVERHEAD", "ID_SIZE", "MAX_PAYLOAD", "MAX_COUNT"):
        assert getattr(_framing, name) == getattr(framing_pure, name)
    assert framing.MAGIC == b"PSF1"
    assert framing.HEADER_SIZE == 8
    assert framing.RECORD_OVERHEAD == 37
    from pysrbup.repo import wire

    assert framing.ID_SIZE == wire.ID_SIZE  # the kernels keep their own copy of the fact
    assert framing.MAX_PAYLOAD == 64 * 1024 * 1024
    assert _framing.FrameError is framing_pure.FrameError is framing.FrameError is FrameError
    assert issubclass(FrameError, ValueError)
    assert framing.unpack_records is _framing.unpack_records
    assert _framing.API_VERSION == native.API_VERSION == 2


def test_golden_encoding():
    # Wire format pin: changing it breaks every deployed client/server pair.
    records = [(bytes(range(32)), 7, b"hello"), (b"\xff" * 32, 0, b"")]
    want = bytes.fromhex(
        "50534631020000000001020304050607"
        "08090a0b0c0d0e0f1011121314151617"
        "18191a1b1c1d1e1f070500000068656c"
        "6c6fffffffffffffffffffffffffffff"
        "ffffffffffffffffffffffffffffffff"
        "ffff0000000000"
    )
    for impl in (_framing, framing_pure):
        assert bytes(impl.pack_records(records)) == want
        assert as_bytes(impl.unpack_records(want)) == records


@pytest.mark.parametrize("count", [0, 1, 2, 17, 300])
def test_native_matches_pure_round_trip(count):
    rng = random.Random(count)
    records = random_records(rng, count)
    packed = _framing.pack_records(records)
    assert type(packed) is bytes and type(framing_pure.pack_records(records)) is bytes
    assert packed == framing_pure.pack_records(records)
    assert len(packed) == framing.HEADER_SIZE + sum(
        framing.RECORD_OVERHEAD + len(p) for _, _, p in records
    )
    for impl in (_framing, framing_pure):
        assert as_bytes(impl.unpack_records(bytes(packed))) == records
        assert as_bytes(impl.unpack_records(packed)) == records


@pytest.mark.parametrize("impl", IMPLS)
def test_any_buffer_types(impl):
    rng = random.Random(1)
    ids = np.frombuffer(rng.randbytes(64), np.uint64)  # 8 items of 8 bytes = 32 bytes each
    payload = np.arange(1000, dtype=np.uint16)
    records = [
        (memoryview(ids)[:4], 1, payload),
        (bytearray(rng.randbytes(32)), 2, memoryview(b"abcdef")[1:4]),
    ]
    packed = impl.pack_records(records)
    out = impl.unpack_records(memoryview(packed))
    assert bytes(out[0][0]) == ids[:4].tobytes()
    assert bytes(out[0][2]) == payload.tobytes()
    assert bytes(out[1][2]) == b"bcd"
    assert as_bytes(impl.unpack_records(np.frombuffer(bytes(packed), np.uint8))) == as_bytes(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_is_zero_copy(impl):
    records = [(b"i" * 32, 3, b"payload-one"), (b"j" * 32, 4, b"two")]
    buf = bytearray(impl.pack_records(records))
    out = impl.unpack_records(buf)
    assert all(isinstance(x, memoryview) for rec in out for x in (rec[0], rec[2]))
    buf[framing.HEADER_SIZE + framing.RECORD_OVERHEAD] = ord("P")
    assert bytes(out[0][2]) == b"Payload-one"
    with pytest.raises(BufferError):  # views pin the buffer
        buf.append(0)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_rejects_bad_records(impl):
    good = b"x" * 32
    cases = [
        ([(b"x" * 31, 0, b"")], ValueError),
        ([(b"x" * 33, 0, b"")], ValueError),
        ([(good, 256, b"")], ValueError),
        ([(good, -1, b"")], ValueError),
        ([(good, "1", b"")], TypeError),
        ([(good, 1.0, b"")], TypeError),
        ([(good, 0)], ValueError),
        ([(good, 0, "text")], TypeError),
        ([("x" * 32, 0, b"")], TypeError),
        ([(good, 0, memoryview(b"abcd")[::2])], BufferError),
        ([(good, 0, b""), (good, 0, np.zeros(framing.MAX_PAYLOAD + 1, np.uint8))], ValueError),
    ]
    for records, exc in cases:
        with pytest.raises(exc):
            impl.pack_records(records)
    # Exactly MAX_PAYLOAD is fine.
    frame = impl.pack_records([(good, 0, np.zeros(framing.MAX_PAYLOAD, np.uint8))])
    assert len(frame) == framing.HEADER_SIZE + framing.RECORD_OVERHEAD + framing.MAX_PAYLOAD


def _hdr(count: int) -> bytes:
    return b"PSF1" + struct.pack("<I", count)


def _rec(length: int, body: bytes | None = None) -> bytes:
    return (
        b"\x01" * 32
        + b"\x02"
        + struct.pack("<I", length)
        + (b"z" * length if body is None else body)
    )


HOSTILE = {
    "empty": b"",
    "short-header": b"PSF1\x01\x00",
    "bad-magic": b"PSF2" + bytes(4),
    "count-too-big-for-bytes": _hdr(2) + _rec(0),
    "count-max-u32": _hdr(0xFFFFFFFF) + _rec(0),
    "truncated-record-header": _hdr(1) + _rec(0)[:36],
    "truncated-payload": _hdr(1) + _rec(10, b"z" * 9),
    "huge-length": _hdr(1) + _rec(0xFFFFFFFF, b""),
    "length-over-limit": _hdr(1) + _rec(framing.MAX_PAYLOAD + 1, b""),
    "trailing-garbage": _hdr(1) + _rec(3) + b"!",
    "trailing-record": _hdr(1) + _rec(0) + _rec(0),
    "count-zero-with-data": _hdr(0) + _rec(0),
    "second-record-truncated": _hdr(2) + _rec(40) + _rec(0)[:20],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_rejected_identically(name):
    data = HOSTILE[name]
    native, pure = outcome(_framing, data), outcome(framing_pure, data)
    assert native[0] == "error", native
    assert native == pure


def test_limits():
    frame = bytes(framing_pure.pack_records([(b"a" * 32, 0, b"x" * 100)] * 3))
    for impl in (_framing, framing_pure):
        assert len(impl.unpack_records(frame, max_payload=100, max_records=3)) == 3
        with pytest.raises(FrameError, match="limit is 2"):
            impl.unpack_records(frame, max_records=2)
        with pytest.raises(FrameError, match="exceeds 99"):
            impl.unpack_records(frame, max_payload=99)
        with pytest.raises(ValueError):
            impl.unpack_records(frame, max_payload=-1)
        # A claimed count is checked against the bytes present before any allocation.
        with pytest.raises(FrameError, match="has only"):
            impl.unpack_records(_hdr(0xFFFFFFFF), max_records=1 << 40)


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_parse_identically(data):
    assert outcome(_framing, data) == outcome(framing_pure, data)
    prefixed = b"PSF1" + data
    assert outcome(_framing, prefixed) == outcome(framing_pure, prefixed)


@st.composite
def mutated_frames(draw):
    count = draw(st.integers(0, 4))
    records = [
        (
            draw(st.binary(min_size=32, max_size=32)),
            draw(st.integers(0, 255)),
            draw(st.binary(max_size=60)),
        )
        for _ in range(count)
    ]
    frame = bytearray(framing_pure.pack_records(records))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "append", "setbyte"]))
        if op == "truncate" and frame:
            del frame[draw(st.integers(0, len(frame) - 1)) :]
        elif op == "append":
            frame += draw(st.binary(min_size=1, max_size=8))
        elif frame:
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] = frame[pos] ^ 0xFF if op == "flip" else draw(st.integers(0, 255))
    return bytes(frame)


@SETTINGS
@given(mutated_frames(), st.integers(0, 70), st.integers(0, 5))
def test_mutated_frames_parse_identically(data, max_payload, max_records):
    assert outcome(_framing, data) == outcome(framing_pure, data)
    kwargs = {"max_payload": max_payload, "max_records": max_records}
    assert outcome(_framing, data, **kwargs) == outcome(framing_pure, data, **kwargs)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32), st.integers(0, 255), st.binary(max_size=300)
        ),
        max_size=12,
    )
)
def test_round_trip_property(records):
    packed = _framing.pack_records(records)
    assert packed == framing_pure.pack_records(records)
    assert as_bytes(_framing.unpack_records(packed)) == records
    assert as_bytes(framing_pure.unpack_records(packed)) == records
