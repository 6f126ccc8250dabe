"""The server's per-frame upload and fetch paths, over real gRPC on loopback.

The server runs in the test process (its storage, servicer and gRPC are the
real ones), so a test can shrink the pack and fetch frame sizes, reach into
the index, and damage pack files on disk; the peer speaks the wire protocol
with raw frames.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from helpers import initialise_repository
from peer import Peer

from pysrbup._native import framing
from pysrbup.crypto.keys import MasterKey
from pysrbup.repo import wire
from pysrbup.server import blobstore, ecc, packs, servicer
from pysrbup.server.blobstore import LocalStore
from pysrbup.server.index import Index
from pysrbup.server.packs import Entry
from pysrbup.server.serve import serve
from pysrbup.server.storage import Repository

KEY = MasterKey.generate()
PACK_TARGET = 256 * 1024
FRAME_BYTES = 64 * 1024


def _initialise(repo: Repository) -> None:
    initialise_repository(repo, KEY)


@pytest.fixture
def live(tmp_path, monkeypatch):
    """(repository, peer with the key) on a TLS server in this process; small packs, frames."""
    monkeypatch.setattr(packs, "TARGET_PACK_SIZE", PACK_TARGET)
    monkeypatch.setattr(servicer, "FETCH_FRAME_BYTES", FRAME_BYTES)
    repo = Repository.open(str(tmp_path / "repo"), ecc_level=None)
    _initialise(repo)
    server, port = serve(repo, "127.0.0.1:0", 2)
    peer = Peer(SimpleNamespace(repo=repo.root, address=f"127.0.0.1:{port}"), KEY)
    try:
        yield repo, peer
    finally:
        peer.close()
        server.stop(grace=None)
        repo.close()


def _frame(records: list[tuple[bytes, bytes]]) -> bytes:
    return framing.pack_records([(oid, 0, payload) for oid, payload in records])


def _objects(count: int, size: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [(rng.randbytes(32), rng.randbytes(size)) for _ in range(count)]


def _fetch_frames(peer: Peer, oids: list[bytes]) -> list[bytes]:
    return list(peer._fetch(b"".join(oids), timeout=30))


# ---- upload ---------------------------------------------------------------------------


def test_a_frame_crossing_a_pack_boundary_stores_each_id_once(live):
    repo, peer = live
    objs = _objects(10, 40_000, 1)  # 7 records fill a 256 KiB pack: it is sealed mid-frame
    first = [*objs, objs[1], objs[8]]  # a repeat of a sealed pack's id, and of the open one's
    second = [objs[2], *_objects(1, 3000, 2)]
    session = peer.begin_session()
    acks = peer.upload(session.upload_metadata(), [_frame(first), _frame(second)])
    frames, stored, dropped, stored_bytes = acks[-1]
    assert (frames, stored, dropped) == (2, 11, 3)
    assert stored_bytes == 10 * 40_000 + 3000
    everything = dict(objs + second)
    logged = [oid for oid, op in peer.all_ids()]
    assert logged == [oid for oid, _ in objs] + [second[1][0]]  # upload order, once each
    fetched = {oid: payload for oid, status, payload in peer.fetch(list(everything))}
    assert fetched == everything
    in_packs: list[bytes] = []
    for pack, _, _ in repo.index.packs():
        in_packs += [e.oid for e in repo.index.pack_objects(pack)]
    assert sorted(in_packs) == sorted(everything)
    assert len(repo.index.packs()) >= 2


def test_an_id_stored_by_an_earlier_session_is_dropped_and_a_condemned_one_revived(live):
    repo, peer = live
    old = _objects(3, 2000, 3)
    peer.upload_records(peer.begin_session(), old)
    repo.index.condemn([old[0][0]], watermark=0)
    new = _objects(2, 2000, 4)
    acks = peer.upload_records(peer.begin_session(), [old[0], old[1], *new])
    assert acks[-1][1:3] == (2, 2)
    ops = [(oid, op) for oid, op in peer.all_ids() if oid == old[0][0]]
    assert ops == [(old[0][0], wire.OP_ADD), (old[0][0], wire.OP_CONDEMN), (old[0][0], wire.OP_ADD)]
    assert repo.index.totals()[2] == 0  # nothing is condemned any more
    fetched = {oid: payload for oid, _, payload in peer.fetch([oid for oid, _ in old + new])}
    assert fetched == dict(old + new)


def test_an_oversized_record_rolls_its_frame_back(live, monkeypatch):
    repo, peer = live
    monkeypatch.setattr(packs, "MAX_OBJECT_SIZE", 50_000)
    kept = _objects(2, 1000, 5)
    session = peer.begin_session()
    peer.upload(session.upload_metadata(), [_frame(kept)])
    refused = [*_objects(1, 10, 6), *_objects(1, 50_001, 7)]
    with pytest.raises(grpc.RpcError) as info:
        peer.upload(session.upload_metadata(), [_frame(refused)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in info.value.details()
    assert repo.has_objects([oid for oid, _ in kept + refused]) == b"\x01\x01\x00\x00"
    assert [oid for oid, _ in peer.all_ids()] == [oid for oid, _ in kept]


def test_adding_known_entries_logs_only_the_new_ones(tmp_path):
    index = Index(str(tmp_path / "index.sqlite"))
    pack = index.add_pack("packs/aa/x.pack")
    first = [Entry(bytes([i]) * 32, 100 * i + 72, 10) for i in range(1, 4)]
    assert index.add_objects(pack, first) == 3
    moved = Entry(first[1].oid, 5555, 10)  # a known id elsewhere: kept where it was
    again = [Entry(bytes([9]) * 32, 999, 5), moved, Entry(bytes([8]) * 32, 1999, 6)]
    assert index.add_objects(pack, again) == 2
    logged = [oid for _, oid, _ in index.log_after(0, 100, 1 << 62)]
    assert logged == [e.oid for e in first] + [bytes([9]) * 32, bytes([8]) * 32]
    assert index.lookup_many([first[1].oid]) == {first[1].oid: (pack, 272, 10)}
    index.close()


# ---- fetch ----------------------------------------------------------------------------


def test_fetch_frames_are_canonical_and_in_pack_order(live):
    repo, peer = live
    rng = random.Random(7)
    objs = [(rng.randbytes(32), rng.randbytes(rng.randint(0, 30_000))) for _ in range(60)]
    session = peer.begin_session()
    peer.upload(session.upload_metadata(), [_frame(objs[:30]), _frame(objs[30:])])
    missing = [os.urandom(32) for _ in range(3)]
    wanted = [oid for oid, _ in objs]
    rng.shuffle(wanted)
    request = [missing[0], *wanted[:20], missing[1], wanted[0], *wanted[20:], missing[2]]
    frames = _fetch_frames(peer, request)
    assert len(frames) > 1
    records = []
    for frame in frames:
        parsed = framing.unpack_records(frame)
        assert frame == framing.pack_records(parsed)  # the layout, byte for byte
        assert len(frame) - len(parsed[-1][2]) - framing.RECORD_OVERHEAD < FRAME_BYTES
        records += [(bytes(oid), status, bytes(payload)) for oid, status, payload in parsed]
    assert records[:3] == [(oid, wire.FETCH_MISSING, b"") for oid in missing]
    places = repo.index.lookup_many(wanted)
    in_order = sorted(dict(objs).items(), key=lambda item: places[item[0]])
    assert records[3:] == [(oid, wire.FETCH_FOUND, payload) for oid, payload in in_order]


def test_damaged_and_truncated_records_are_reported_not_served(live):
    repo, peer = live
    objs = _objects(6, 5000, 8)
    session = peer.begin_session()
    peer.upload_records(session, objs)
    repo.end_session(repo._sessions[session.session_id])
    repo.packs.flush()
    (_, name, _), *_ = repo.index.packs()
    path = repo.store.path(name)
    where = repo.index.lookup_many([oid for oid, _ in objs])
    _, offset, _ = where[objs[1][0]]
    with open(path, "r+b") as handle:  # one flipped payload byte
        handle.seek(offset + 100)
        byte = handle.read(1)
        handle.seek(offset + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
        handle.seek(where[objs[3][0]][1] - packs.RECORD.size)  # a record header's id
        handle.write(b"\0" * 4)
    _, last, length = where[objs[5][0]]
    os.truncate(path, last + length - 1)  # the last record cut short
    got = {oid: (status, payload) for oid, status, payload in peer.fetch(list(dict(objs)))}
    damaged = {objs[1][0], objs[3][0], objs[5][0]}
    for oid, payload in objs:
        if oid in damaged:
            assert got[oid] == (wire.FETCH_DAMAGED, b"")
        else:
            assert got[oid] == (wire.FETCH_FOUND, payload)
    assert repo.counters.read_damaged_objects == 3


def test_hostile_fetch_requests_get_clean_errors(live):
    _, peer = live
    objs = _objects(2, 100, 9)
    peer.upload_records(peer.begin_session(), objs)
    for request in (b"\x01" * 33, b"\0" * 32 * (wire.MAX_IDS_PER_REQUEST + 1)):
        with pytest.raises(grpc.RpcError) as info:
            list(peer._fetch(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(peer._fetch(b"", timeout=30)) == []
    repeated = peer.fetch([objs[0][0]] * 5 + [b"\0" * 32] * 2)
    assert repeated == [(b"\0" * 32, wire.FETCH_MISSING, b"")] * 2 + [
        (objs[0][0], wire.FETCH_FOUND, objs[0][1])
    ]
    assert dict((o, p) for o, _, p in peer.fetch([o for o, _ in objs])) == dict(objs)


# ---- parity buffers -----------------------------------------------------------------


def test_sidecars_from_reused_buffers_equal_fresh_ones(tmp_path):
    level = ecc.EccLevel(5, 2)
    workspace = ecc.Workspace()
    rng = np.random.default_rng(3)
    for size in (300_000, 90_001, 450_123, 7):  # shrinking leaves stale bytes to pad over
        pack = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        fresh, _ = ecc.encode(pack, level, block=4096)
        reused, _ = ecc.encode(pack, level, block=4096, workspace=workspace)
        assert reused == fresh
        assert not ecc.check(pack, reused).check.blocks_repaired


def test_a_local_store_reads_a_whole_object_into_a_given_buffer(tmp_path):
    store = LocalStore(str(tmp_path))
    data = os.urandom(100_000)
    store.put("packs/ab/x.pack", data)
    buffer = bytearray(200_000)
    got = store.get_into("packs/ab/x.pack", lambda size: memoryview(buffer)[:size])
    assert bytes(got) == data and bytes(buffer[: len(data)]) == data
    with pytest.raises(blobstore.BlobNotFoundError):
        store.get_into("packs/ab/y.pack", bytearray)
