"""Throughput of the native kernels against their pure twins and reedsolo.

Run: ``pytest bench/native --benchmark-only`` (about a minute). Each group
compares the compiled kernel with its baseline on the same parameters; pure
Python baselines run on smaller inputs (MB/s is size-independent here).
"""

from __future__ import annotations

import numpy as np
import pytest
import reedsolo

from pysrbup._native import (
    _chunker,
    _framing,
    _rs,
    chunker_pure,
    framing_pure,
    records_pure,
    rs_pure,
)
from pysrbup._native import _records as records_native
from pysrbup._native.gear import gear_table

MB = 1 << 20
GEAR = gear_table(b"benchmark seed")
DEFAULTS = (_chunker.DEFAULT_MIN, _chunker.DEFAULT_AVG, _chunker.DEFAULT_MAX, True)


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


# --- chunker ----------------------------------------------------------------

CHUNK_DATA = rand_bytes(64 * MB, 1)


def test_chunker_native(throughput):
    throughput(
        lambda: _chunker.cut_points(GEAR, CHUNK_DATA, *DEFAULTS),
        len(CHUNK_DATA),
        group="chunker default",
    )


def test_chunker_pure(throughput):
    data = CHUNK_DATA[: 4 * MB]
    throughput(
        lambda: chunker_pure.cut_points(GEAR, data, *DEFAULTS),
        len(data),
        rounds=2,
        group="chunker default",
    )


# --- Reed-Solomon RS(10,4) ------------------------------------------------------

K, M = 10, 4
LOST = [0, 3, 7, 12]


def _stripe(n: int):
    data = np.random.default_rng(2).integers(0, 256, (K, n), dtype=np.uint8)
    shards = np.concatenate([data, _rs.encode(data, M)])
    shards[LOST] = 0
    return data, shards


DATA, SHARDS = _stripe(MB)
SMALL_DATA, SMALL_SHARDS = _stripe(64 * 1024)
PARITY_OUT = np.empty((M, MB), np.uint8)
DATA_OUT = np.empty((K, MB), np.uint8)


@pytest.mark.parametrize("isa", ["avx2", "ssse3", "scalar"])
def test_rs_encode_native(throughput, isa):
    try:
        _rs._set_isa(isa)
    except ValueError:
        pytest.skip(f"CPU lacks {isa}")
    try:
        throughput(
            lambda: _rs.encode(DATA, M, out=PARITY_OUT),
            DATA.nbytes,
            rounds=20,
            group="rs encode 10+4",
        )
    finally:
        _rs._set_isa(None)


def test_rs_encode_pure_numpy(throughput):
    throughput(lambda: rs_pure.encode(DATA, M, out=PARITY_OUT), DATA.nbytes, group="rs encode 10+4")


def test_rs_encode_reedsolo(throughput):
    data = SMALL_DATA[:, :256]
    codec = reedsolo.RSCodec(M)
    columns = [bytes(data[:, p]) for p in range(data.shape[1])]
    throughput(
        lambda: [codec.encode(c) for c in columns], data.nbytes, rounds=3, group="rs encode 10+4"
    )


@pytest.mark.parametrize("isa", ["avx2", "ssse3", "scalar"])
def test_rs_reconstruct4_native(throughput, isa):
    try:
        _rs._set_isa(isa)
    except ValueError:
        pytest.skip(f"CPU lacks {isa}")
    try:
        throughput(
            lambda: _rs.reconstruct(SHARDS, LOST, K, out=DATA_OUT),
            DATA.nbytes,
            rounds=20,
            group="rs reconstruct 4 lost",
        )
    finally:
        _rs._set_isa(None)


def test_rs_reconstruct4_pure_numpy(throughput):
    throughput(
        lambda: rs_pure.reconstruct(SHARDS, LOST, K, out=DATA_OUT),
        DATA.nbytes,
        group="rs reconstruct 4 lost",
    )


def test_rs_reconstruct4_reedsolo(throughput):
    shards = SMALL_SHARDS[:, :256]
    codec = reedsolo.RSCodec(M)
    columns = [bytearray(shards[:, p]) for p in range(shards.shape[1])]
    throughput(
        lambda: [codec.decode(c, erase_pos=LOST) for c in columns],
        K * 256,
        rounds=3,
        group="rs reconstruct 4 lost",
    )


# --- framing ---------------------------------------------------------------------


def _records(count: int, size: int):
    rng = np.random.default_rng(3)
    return [(rng.bytes(32), i & 0xFF, rng.bytes(size)) for i in range(count)]


BIG = _records(256, 64 * 1024)  # 16 MiB of payload
SMALL = _records(10_000, 100)  # per-record overhead dominates
BIG_FRAME = _framing.pack_records(BIG)
SMALL_FRAME = _framing.pack_records(SMALL)


@pytest.mark.parametrize("impl", [_framing, framing_pure], ids=["native", "pure"])
def test_framing_pack_64k(throughput, impl):
    throughput(lambda: impl.pack_records(BIG), len(BIG_FRAME), rounds=10, group="framing pack 64K")


@pytest.mark.parametrize("impl", [_framing, framing_pure], ids=["native", "pure"])
def test_framing_pack_100b(throughput, impl):
    throughput(
        lambda: impl.pack_records(SMALL), len(SMALL_FRAME), rounds=10, group="framing pack 100B"
    )


@pytest.mark.parametrize("impl", [_framing, framing_pure], ids=["native", "pure"])
def test_framing_unpack_64k(throughput, impl):
    throughput(
        lambda: impl.unpack_records(BIG_FRAME),
        len(BIG_FRAME),
        rounds=10,
        group="framing unpack 64K",
    )


@pytest.mark.parametrize("impl", [_framing, framing_pure], ids=["native", "pure"])
def test_framing_unpack_100b(throughput, impl):
    throughput(
        lambda: impl.unpack_records(SMALL_FRAME),
        len(SMALL_FRAME),
        rounds=10,
        group="framing unpack 100B",
    )


# --- sorted records (the client's id set) -----------------------------------------

IDS = rand_bytes(32 * 200_000, 5)  # 200,000 random 32-byte ids
PROBES = [IDS[at : at + 32] for at in range(0, len(IDS), 32 * 200)]


@pytest.mark.parametrize("impl", [records_native, records_pure], ids=["native", "pure"])
def test_records_sort_200k_ids(throughput, impl):
    throughput(
        lambda buf: impl.sort_unique(buf, 32, 32),
        len(IDS),
        rounds=3,
        group="records sort 200k ids",
        setup=lambda: ((bytearray(IDS),), {}),
    )


@pytest.mark.parametrize("impl", [records_native, records_pure], ids=["native", "pure"])
def test_records_find_200k_ids(throughput, impl):
    table = bytearray(IDS)
    del table[impl.sort_unique(table, 32, 32) * 32 :]
    throughput(
        lambda: impl.find_many(table, 32, PROBES),
        len(PROBES) * 32,
        rounds=5,
        group="records find in 200k ids",
    )
