"""Tests of Reed-Solomon: compiled (every ISA variant) vs numpy twin vs reedsolo, erasures, pins."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import reedsolo

from pysrbup import _native as native
from pysrbup._native import _rs, gf256, rs, rs_pure


def _available_isas() -> list[str]:
    out = []
    for isa in ("scalar", "ssse3", "avx2"):
        try:
            _rs._set_isa(isa)
        except ValueError:
            continue
        out.append(isa)
    _rs._set_isa(None)
    return out


ISAS = _available_isas()


@pytest.fixture(params=[*ISAS, "pure"])
def impl(request):
    """The numpy twin, or the compiled kernel forced to one instruction set."""
    if request.param == "pure":
        yield rs_pure
        return
    _rs._set_isa(request.param)
    try:
        yield _rs
    finally:
        _rs._set_isa(None)


def rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reedsolo_parity(data: np.ndarray, m: int) -> np.ndarray:
    codec = reedsolo.RSCodec(m)
    cols = [bytes(codec.encode(bytes(data[:, p]))[-m:]) for p in range(data.shape[1])]
    return np.frombuffer(b"".join(cols), np.uint8).reshape(data.shape[1], m).T.copy()


def test_api():
    assert rs.encode is _rs.encode
    assert rs.reconstruct is _rs.reconstruct
    assert _rs.MAX_SHARDS == rs_pure.MAX_SHARDS == 255
    assert _rs.API_VERSION == native.API_VERSION == 2
    assert _rs._get_isa() in ISAS


def test_field_tables():
    a = np.arange(256)
    mul = gf256.MUL.astype(int)
    assert np.array_equal(mul, mul.T)
    assert np.all(mul[1] == a) and np.all(mul[0] == 0)
    assert np.all(gf256.MUL[a[1:], gf256.INV[1:]] == 1)
    # Distributive over XOR (field addition), on a sample.
    rng = np.random.default_rng(0)
    x, y, z = rng.integers(0, 256, (3, 1000))
    assert np.array_equal(mul[x, y ^ z], mul[x, y] ^ mul[x, z])
    reedsolo.RSCodec(4)  # (re)initialises reedsolo's global tables to the defaults
    assert gf256.generator_poly(4) == list(reedsolo.rs_generator_poly(4))


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 1), (10, 4), (4, 2), (3, 7), (17, 3), (200, 55)])
def test_parity_matrix_matches_reedsolo(k, m):
    pm = gf256.parity_matrix(k, m)
    assert pm.shape == (m, k)
    codec = reedsolo.RSCodec(m)
    for j in range(k):
        unit = bytes(1 if i == j else 0 for i in range(k))
        assert bytes(pm[:, j]) == bytes(codec.encode(unit)[-m:])


def test_inverse():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 12):
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        try:
            inv = gf256.inverse(a)
        except ValueError:
            continue
        assert np.array_equal(gf256.matmul(a, inv), np.eye(n, dtype=np.uint8))
    with pytest.raises(ValueError, match="singular"):
        gf256.inverse(np.array([[1, 2], [1, 2]], dtype=np.uint8))


@pytest.mark.parametrize(("k", "m"), [(10, 4), (1, 1), (5, 3), (13, 2), (3, 6)])
def test_encode_matches_reedsolo(impl, k, m):
    data = rand((k, 70), k * 100 + m)
    assert np.array_equal(impl.encode(data, m), reedsolo_parity(data, m))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4097])
def test_native_matches_pure_all_lengths(n):
    data = rand((10, n), n)
    want = rs_pure.encode(data, 4)
    for isa in ISAS:
        _rs._set_isa(isa)
        try:
            assert np.array_equal(_rs.encode(data, 4), want), isa
        finally:
            _rs._set_isa(None)


def test_native_matches_pure_large():
    data = rand((12, (1 << 18) + 3), 7)
    parity = _rs.encode(data, 5)
    assert np.array_equal(parity, rs_pure.encode(data, 5))
    shards = np.concatenate([data, parity])
    lost = [0, 4, 11, 13, 16]
    shards[lost] = 0xAA
    assert np.array_equal(_rs.reconstruct(shards, lost, 12), data)
    assert np.array_equal(rs_pure.reconstruct(shards, lost, 12), data)


@pytest.mark.parametrize(("k", "m"), [(3, 2), (4, 3), (2, 4), (6, 2), (1, 3)])
def test_all_erasure_patterns(impl, k, m):
    data = rand((k, 67), k + 10 * m)
    parity = impl.encode(data, m)
    full = np.concatenate([data, parity])
    for lost_count in range(m + 1):
        for lost in itertools.combinations(range(k + m), lost_count):
            shards = full.copy()
            shards[list(lost)] = np.random.default_rng(len(lost)).integers(0, 256, 67)
            got = impl.reconstruct(shards, list(lost), k)
            assert np.array_equal(got, data), lost


def test_rs_10_4_all_four_loss_patterns():
    data = rand((10, 100), 3)
    full = np.concatenate([data, _rs.encode(data, 4)])
    for lost in itertools.combinations(range(14), 4):
        shards = full.copy()
        shards[list(lost)] = 0
        assert np.array_equal(_rs.reconstruct(shards, lost, 10), data), lost


def test_reconstruct_in_place_and_out(impl):
    data = rand((6, 300), 9)
    shards = np.concatenate([data, impl.encode(data, 3)])
    shards[[1, 4, 7]] = 0
    out = np.empty((6, 300), np.uint8)
    assert impl.reconstruct(shards, [1, 4, 7], 6, out=out) is out
    assert np.array_equal(out, data)
    view = shards[:6]
    impl.reconstruct(shards, (7, 4, 1), 6, out=view)
    assert np.array_equal(shards[:6], data)
    parity = np.empty((3, 300), np.uint8)
    assert impl.encode(data, 3, out=parity) is parity


def test_non_contiguous_input(impl):
    base = rand((8, 200), 11)
    data = base[:, ::2]
    assert np.array_equal(impl.encode(data, 2), reedsolo_parity(np.ascontiguousarray(data), 2))


def test_errors(impl):
    data = rand((4, 10))
    full = np.concatenate([data, impl.encode(data, 2)])
    with pytest.raises(ValueError, match="at most 2"):
        impl.reconstruct(full, [0, 1, 2], 4)
    with pytest.raises(ValueError, match="duplicate"):
        impl.reconstruct(full, [1, 1], 4)
    with pytest.raises(ValueError):
        impl.reconstruct(full, [6], 4)
    with pytest.raises(ValueError):
        impl.reconstruct(full, [-1], 4)
    for bad_k in (0, 6, 7):
        with pytest.raises(ValueError):
            impl.reconstruct(full, [], bad_k)
    with pytest.raises(ValueError):
        impl.encode(data, 0)
    with pytest.raises(ValueError):
        impl.encode(rand((250, 4)), 6)
    with pytest.raises(ValueError):
        impl.encode(data.astype(np.uint16), 2)
    with pytest.raises(ValueError):
        impl.encode(data[0], 2)
    with pytest.raises(TypeError):
        impl.encode(bytes(40), 2)
    with pytest.raises(ValueError):
        impl.encode(data, 2, out=np.empty((2, 9), np.uint8))
    with pytest.raises(ValueError):
        impl.reconstruct(full.astype(np.int8), [], 4)
    assert np.array_equal(impl.reconstruct(full, [], 4), data)
    assert np.array_equal(impl.reconstruct(full, [4, 5], 4), data)


def test_encode_rejects_overlapping_out():
    buf = rand((6, 10))
    with pytest.raises(ValueError, match="overlap"):
        _rs.encode(buf[:4], 2, out=buf[3:5])


def test_max_code():
    data = rand((251, 33), 5)
    parity = _rs.encode(data, 4)
    assert np.array_equal(parity, reedsolo_parity(data, 4))
    shards = np.concatenate([data, parity])
    lost = [0, 100, 250, 253]
    shards[lost] = 1
    assert np.array_equal(_rs.reconstruct(shards, lost, 251), data)


# Golden pins: parity is stored on disk (pack sidecar files). Optimisations of
# either twin must NOT change these values.
def test_golden_parity(impl):
    column = np.frombuffer(bytes(range(10)), np.uint8).reshape(10, 1)
    assert impl.encode(column, 4).tobytes().hex() == "f09f84ea"
    data = np.random.default_rng(1234).integers(0, 256, (10, 1000), dtype=np.uint8)
    digest = hashlib.sha256(impl.encode(data, 4).tobytes()).hexdigest()
    assert digest == "e7d133658bd195f96ae927cd994fd4324c5ec2626257ecbb1f5e21f04f1e6143"
