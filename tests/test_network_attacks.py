"""Attacks from the network: a peer without the key (or with a session it sniffed) must not
be able to break, roll back or stall a backup. Each test mounts one attack against a real
server on loopback, then checks that every legitimate backup still restores byte for byte.
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import assert_no_traceback
from peer import Peer
from trees import random_bytes, snapshot_tree

from pysrbup.client.session import WriteSession
from pysrbup.crypto.keyfile import load_key_file
from pysrbup.crypto.keys import MasterKey
from pysrbup.proto import service_pb2
from pysrbup.repo import auth, wire


def _source(tmp_path, name: str, seed: int, size: int = 1_500_000):
    src = tmp_path / name
    src.mkdir()
    (src / "data.bin").write_bytes(random_bytes(size, seed))
    (src / "note.txt").write_text(f"note {seed}\n" * 100)
    return src


def _assert_restores(tmp_path, client, key_file, backup_id: str, src) -> None:
    out = tmp_path / f"restore-{backup_id}-{time.monotonic_ns()}"
    client.run("restore", backup_id, str(out), key_file, check=True)
    assert snapshot_tree(str(out / src.name)) == snapshot_tree(str(src))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _forged(peer: Peer, session_id: str) -> WriteSession:
    """A session object for ``session_id`` signed by a key the server never saw."""
    return WriteSession(peer.repo_id, session_id, Ed25519PrivateKey.generate())


def test_keyless_peer_cannot_plant_objects_under_condemned_ids(tmp_path, client, key_file, server):
    """Attack: read the public id log, upload garbage under the ids a delete condemned."""
    src = _source(tmp_path, "src", 1)
    doomed = client.backup(str(src), key_file)
    client.run("delete", doomed, key_file, check=True)
    with Peer(server) as peer:
        condemned = [oid for oid, op in peer.all_ids() if op == wire.OP_CONDEMN]
        assert condemned
        stranger = MasterKey.generate()
        assert _code(lambda: peer.begin_session(stranger)) == grpc.StatusCode.PERMISSION_DENIED
        fake = _forged(peer, "0" * 32)
        garbage = [(oid, os.urandom(200)) for oid in condemned]
        assert _code(lambda: peer.upload_records(fake, garbage)) == grpc.StatusCode.NOT_FOUND
        assert peer.stub.HasObjects(
            service_pb2.HasObjectsRequest(ids=b"".join(condemned))
        ).present == bytes(len(condemned))
    again = client.backup(str(src), key_file)  # the same data once more: nothing to dedup on
    _assert_restores(tmp_path, client, key_file, again, src)


def test_keyless_peer_cannot_commit_a_junk_record(tmp_path, client, key_file, server):
    """Attack: commit one junk snapshot record so that listing, delete and GC fail."""
    src = _source(tmp_path, "src", 2)
    backup_id = client.backup(str(src), key_file)
    with Peer(server) as peer:
        fake = _forged(peer, "f" * 32)
        assert _code(lambda: peer.commit(fake, "0123456789abcdef", b"junk")) in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        key_id, wrapped = os.urandom(16), os.urandom(60)
        put = service_pb2.PutSessionKeyRequest(
            proof=fake.proof(auth.OP_PUT_KEY, auth.put_key_body(key_id, wrapped)),
            key_id=key_id,
            wrapped=wrapped,
        )
        assert _code(lambda: peer.stub.PutSessionKey(put)) == grpc.StatusCode.NOT_FOUND
    listing = client.run("list", "--key-file", key_file, check=True)
    assert [line.split()[0] for line in listing.stdout.splitlines()] == [backup_id]
    _assert_restores(tmp_path, client, key_file, backup_id, src)
    client.run("delete", backup_id, key_file, check=True)


def test_first_writer_cannot_take_over_a_new_repository(tmp_path, client, key_file, server):
    """Attack: register one's own key on a fresh repository before the owner does."""
    stranger = MasterKey.generate()
    with Peer(server) as peer:
        assert not peer.info.write_public_key
        for token in (b"", b"guess", os.urandom(24).hex().encode()):
            message = auth.init_message(
                peer.repo_id, token, stranger.write_public_key, stranger.destroy_public_key
            )
            request = service_pb2.InitRequest(
                token=token,
                write_public_key=stranger.write_public_key,
                destroy_public_key=stranger.destroy_public_key,
                write_signature=stranger.write_key.sign(message),
                destroy_signature=stranger.destroy_key.sign(message),
            )
            assert _code(lambda r=request: peer.stub.InitRepository(r)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
    # Without the token the owner is told how to initialise; with it the backup works.
    plain = server.client(client.env["PYSRBUP_CACHE_DIR"])
    plain.env.pop("PYSRBUP_INIT_TOKEN")
    src = _source(tmp_path, "src", 3)
    refused = plain.run("backup", str(src), key_file)
    assert refused.returncode == 1 and "init --init-token" in refused.stderr, refused.stderr
    assert_no_traceback(refused)
    token = server.init_token
    init = plain.run("init", key_file, "--init-token", token, check=True)
    assert "Initialised repository" in init.stdout
    assert not os.path.exists(os.path.join(server.repo, "init-token"))
    backup_id = plain.backup(str(src), key_file)
    _assert_restores(tmp_path, plain, key_file, backup_id, src)
    # The token is spent, and another key is now the wrong key.
    other = tmp_path / "other.key"
    plain.run("generate_key", str(other), check=True)
    again = plain.run("init", str(other), "--init-token", token)
    assert again.returncode == 1 and "does not belong" in again.stderr, again.stderr


def test_deleted_backup_cannot_be_replayed(tmp_path, client, key_file, server):
    """Attack: revive a deleted backup's objects and commit its captured record again."""
    keep_src = _source(tmp_path, "keep", 4)
    keep = client.backup(str(keep_src), key_file)
    src = _source(tmp_path, "src", 5)
    doomed = client.backup(str(src), key_file)
    with Peer(server) as peer:
        captured = {
            i.snapshot_id: i.record
            for i in peer.stub.ListSnapshots(service_pb2.ListSnapshotsRequest())
        }[doomed]
    client.run("delete", doomed, key_file, check=True)
    with Peer(server) as peer:
        assert _code(lambda: peer.commit(_forged(peer, "a" * 32), doomed, captured)) in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        )
    # Not even the key holder's own session may bring a deleted id back.
    with Peer(server, load_key_file(key_file)) as owner:
        session = owner.begin_session()
        assert _code(lambda: owner.commit(session, doomed, captured)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    listing = client.run("list", check=True).stdout
    assert doomed not in listing and keep in listing
    _assert_restores(tmp_path, client, key_file, keep, keep_src)
    client.run("delete", keep, key_file, check=True)


def test_sniffed_session_id_is_worth_nothing(tmp_path, client, key_file, server):
    """Attack: use (or keep alive, or end) a session whose id was seen on the wire."""
    client.backup(str(_source(tmp_path, "first", 6)), key_file)
    key = load_key_file(key_file)
    with Peer(server, key) as owner, Peer(server) as sniffer:
        session = owner.begin_session()
        hijack = _forged(sniffer, session.session_id)
        oid = os.urandom(32)
        assert _code(lambda: sniffer.upload_records(hijack, [(oid, b"x" * 100)])) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        end = service_pb2.EndSessionRequest(proof=hijack.proof(auth.OP_END))
        assert _code(lambda: sniffer.stub.EndSession(end)) == grpc.StatusCode.PERMISSION_DENIED
        blob = oid
        revive = service_pb2.ReviveRequest(
            proof=hijack.proof(auth.OP_REVIVE, auth.ids_body(blob)), ids=blob
        )
        assert _code(lambda: sniffer.stub.Revive(revive)) == grpc.StatusCode.PERMISSION_DENIED
        # A proof captured on the wire cannot be replayed, nor moved to another request.
        captured = service_pb2.ReviveRequest(
            proof=session.proof(auth.OP_REVIVE, auth.ids_body(blob)), ids=blob
        )
        owner.stub.Revive(captured)
        assert _code(lambda: sniffer.stub.Revive(captured)) == grpc.StatusCode.PERMISSION_DENIED
        moved = service_pb2.ReviveRequest(proof=session.proof(auth.OP_END), ids=blob)
        assert _code(lambda: sniffer.stub.Revive(moved)) == grpc.StatusCode.PERMISSION_DENIED
        other_ids = service_pb2.ReviveRequest(
            proof=session.proof(auth.OP_REVIVE, auth.ids_body(blob)), ids=os.urandom(32)
        )
        assert _code(lambda: sniffer.stub.Revive(other_ids)) == (grpc.StatusCode.PERMISSION_DENIED)
        # The owner's session is untouched by all of it.
        acks = owner.upload_records(session, [(oid, b"y" * 100)])
        assert acks[-1][:2] == (1, 1)
    assert not [line for line in server.log().splitlines() if "Traceback" in line]


def test_a_second_stream_cannot_drop_acknowledged_records(tmp_path, client, key_file, server):
    """Attack: a malformed frame on another stream of the same session rolls back the first."""
    client.backup(str(_source(tmp_path, "first", 7)), key_file)
    key = load_key_file(key_file)
    from pysrbup._native import framing

    with Peer(server, key) as owner:
        session = owner.begin_session()
        first = [(os.urandom(32), os.urandom(5000)) for _ in range(20)]
        second = [(os.urandom(32), os.urandom(5000)) for _ in range(20)]
        go_on = threading.Event()
        acks: list = []
        errors: list = []

        def frames():
            yield framing.pack_records([(o, 0, p) for o, p in first])
            assert go_on.wait(30)
            yield framing.pack_records([(o, 0, p) for o, p in second])

        call = owner._upload(frames(), metadata=session.upload_metadata(), timeout=60)

        def read():
            try:
                for raw in call:
                    acks.append(wire.UPLOAD_ACK.unpack(raw))
            except grpc.RpcError as exc:
                errors.append(exc.code())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 20
        while not acks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert acks and acks[0][0] == 1  # the first frame is durable and acknowledged
        with pytest.raises(grpc.RpcError) as info:
            owner.upload(session.upload_metadata(), [b"PSF1\x01\x00\x00\x00" + b"\0" * 36])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        go_on.set()
        reader.join(30)
        # The superseded stream is told so; nothing it had acknowledged is lost.
        assert errors == [grpc.StatusCode.ABORTED]
        present = owner.stub.HasObjects(
            service_pb2.HasObjectsRequest(ids=b"".join(o for o, _ in first))
        ).present
        assert present == b"\x01" * len(first)
        fetched = dict((o, p) for o, _, p in owner.fetch([o for o, _ in first]))
        assert fetched == dict(first)


def test_idle_streams_do_not_starve_other_clients(tmp_path, client, key_file, server):
    """Attack: hold upload streams open and idle (4 of them once froze every listing)."""
    src = _source(tmp_path, "src", 8)
    backup_id = client.backup(str(src), key_file)
    release = threading.Event()
    calls = []

    def idle():
        assert release.wait(60)
        yield from ()

    with Peer(server, load_key_file(key_file)) as owner, Peer(server) as stranger:
        for _ in range(6):  # key holders' idle streams, each on its own session
            calls.append(owner._upload(idle(), metadata=owner.begin_session().upload_metadata()))
        for _ in range(6):  # strangers' streams are refused at once
            fake = _forged(stranger, os.urandom(16).hex())
            call = stranger._upload(idle(), metadata=fake.upload_metadata(), timeout=10)
            calls.append(call)
        started = time.monotonic()
        listing = client.run("list", timeout=60, check=True)
        assert backup_id in listing.stdout
        _assert_restores(tmp_path, client, key_file, backup_id, src)
        assert time.monotonic() - started < 45
        release.set()
        for call in calls:
            call.cancel()


def test_condemn_names_the_snapshot_set_the_client_saw(tmp_path, client, key_file, server):
    """Attack (man in the middle): hide backup P from the listing while the user deletes O."""
    hidden_src = _source(tmp_path, "hidden", 9)
    hidden = client.backup(str(hidden_src), key_file)
    key = load_key_file(key_file)
    with Peer(server, key) as peer:
        ids = b"".join(sorted({oid for oid, op in peer.all_ids() if op == wire.OP_ADD}))
        seen_without_p = auth.snapshot_set_digest([])
        challenge = peer.challenge()
        signature = key.destroy_key.sign(
            auth.condemn_message(peer.repo_id, challenge, seen_without_p, ids)
        )
        request = service_pb2.CondemnRequest(
            ids=ids, snapshot_set=seen_without_p, challenge=challenge, signature=signature
        )
        assert _code(lambda: peer.stub.Condemn(request)) == grpc.StatusCode.ABORTED
        # A signature over one set cannot be reused for another.
        challenge = peer.challenge()
        request = service_pb2.CondemnRequest(
            ids=ids,
            snapshot_set=auth.snapshot_set_digest([hidden]),
            challenge=challenge,
            signature=signature,
        )
        assert _code(lambda: peer.stub.Condemn(request)) == grpc.StatusCode.PERMISSION_DENIED
    _assert_restores(tmp_path, client, key_file, hidden, hidden_src)


def test_backups_vanishing_from_a_listing_are_reported(tmp_path, client, key_file, server):
    """A rolled-back or filtered snapshot list does not go unnoticed."""
    first = client.backup(str(_source(tmp_path, "a", 10, 1000)), key_file)
    second = client.backup(str(_source(tmp_path, "b", 11, 1000)), key_file)
    assert second in client.run("list", check=True).stdout
    key = load_key_file(key_file)
    with Peer(server, key) as peer:  # behind this client's back
        challenge = peer.challenge()
        peer.stub.DeleteSnapshot(
            service_pb2.DeleteSnapshotRequest(
                snapshot_id=second,
                challenge=challenge,
                signature=key.destroy_key.sign(
                    auth.delete_message(peer.repo_id, challenge, second)
                ),
            )
        )
    listing = client.run("list", check=True)
    assert "gone without a delete from this machine" in listing.stderr
    assert second in listing.stderr and first in listing.stdout
    # Our own deletes are expected: no warning for them.
    client.run("delete", first, key_file, check=True)
    assert "gone without" not in client.run("list", check=True).stderr


def test_out_of_range_integers_are_refused_cleanly(tmp_path, client, key_file, server):
    client.backup(str(_source(tmp_path, "src", 12, 1000)), key_file)
    with Peer(server, load_key_file(key_file)) as owner:
        too_big = (1 << 64) - 1
        stream = owner.stub.SyncIds(service_pb2.SyncRequest(after_seq=too_big))
        assert _code(lambda: list(stream)) == grpc.StatusCode.INVALID_ARGUMENT
        session = owner.begin_session()
        assert _code(lambda: owner.commit(session, "0123456789abcdef", b"r", too_big)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        bad_seq = service_pb2.EndSessionRequest(
            proof=service_pb2.SessionProof(
                session_id=session.session_id, seq=too_big, signature=b"x"
            )
        )
        assert _code(lambda: owner.stub.EndSession(bad_seq)) == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in server.log()
    assert client.run("list", check=True).returncode == 0
