"""A peer that speaks pysrbup's wire protocol directly: generated stubs and raw frames.

Tests use it as the hostile (or keyless) party the server must withstand, and
as a key holder that takes shortcuts the real client never takes.
"""

from __future__ import annotations

import os

import grpc

from pysrbup._native import framing
from pysrbup.client.session import WriteSession
from pysrbup.client.tls import pinned_credentials
from pysrbup.crypto.keys import MasterKey
from pysrbup.proto import service_pb2, service_pb2_grpc
from pysrbup.repo import auth, wire


def channel_to(server) -> grpc.Channel:
    """A channel to a test server: pinned to its own certificate, or plaintext."""
    cert = os.path.join(server.repo, "tls", "cert.pem")
    options = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES)]
    if not os.path.exists(cert):
        return grpc.insecure_channel(server.address, options=options)
    with open(cert, "rb") as handle:
        credentials, extra = pinned_credentials(handle.read())
    return grpc.secure_channel(server.address, credentials, options=options + extra)


class Peer:
    """One connection to a server, with or without the repository's key."""

    def __init__(self, server, key: MasterKey | None = None):
        self.channel = channel_to(server)
        self.stub = service_pb2_grpc.BackupStub(self.channel)
        self.key = key
        self.info = self.stub.GetInfo(service_pb2.InfoRequest(), timeout=10)
        self.repo_id = self.info.repo_id
        self._upload = self.channel.stream_stream(wire.UPLOAD_RAW)
        self._fetch = self.channel.unary_stream(wire.FETCH_RAW)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def challenge(self) -> bytes:
        return self.stub.GetChallenge(service_pb2.ChallengeRequest()).challenge

    def all_ids(self) -> list[tuple[bytes, int]]:
        """(id, op) of the whole public id log."""
        out = []
        for batch in self.stub.SyncIds(service_pb2.SyncRequest(after_seq=0)):
            out += list(zip(wire.split_ids(batch.ids), batch.ops, strict=True))
        return out

    def begin_session(self, key: MasterKey | None = None) -> WriteSession:
        """Opens a session signed by ``key`` (default: this peer's key)."""
        key = key or self.key
        private, public = WriteSession.new_key()
        challenge = self.challenge()
        signature = key.write_key.sign(auth.begin_message(self.repo_id, challenge, public))
        reply = self.stub.BeginSession(
            service_pb2.BeginSessionRequest(
                challenge=challenge, session_public_key=public, signature=signature
            )
        )
        return WriteSession(self.repo_id, reply.session_id, private)

    def upload(self, metadata: tuple, frames: list[bytes], timeout: float = 30) -> list[tuple]:
        """Sends raw frames on one upload stream; returns the decoded acks."""
        call = self._upload(iter(frames), metadata=metadata, timeout=timeout)
        return [wire.UPLOAD_ACK.unpack(raw) for raw in call]

    def upload_records(self, session: WriteSession, records: list[tuple[bytes, bytes]]) -> list:
        """Uploads (id, envelope) records in one frame on ``session``."""
        frame = framing.pack_records([(oid, 0, env) for oid, env in records])
        return self.upload(session.upload_metadata(), [frame])

    def fetch(self, oids: list[bytes]) -> list[tuple[bytes, int, bytes]]:
        out = []
        for frame in self._fetch(b"".join(oids), timeout=30):
            out += [(bytes(o), s, bytes(p)) for o, s, p in framing.unpack_records(frame)]
        return out

    def commit(
        self, session: WriteSession, snapshot_id: str, record: bytes, checked_seq: int = 0
    ) -> str:
        proof = session.proof(auth.OP_COMMIT, auth.commit_body(snapshot_id, record, checked_seq))
        return self.stub.CommitSnapshot(
            service_pb2.CommitSnapshotRequest(
                proof=proof, snapshot_id=snapshot_id, record=record, checked_seq=checked_seq
            )
        ).snapshot_id

    def revive(self, session: WriteSession, oids: list[bytes]) -> list[bytes]:
        blob = b"".join(oids)
        reply = self.stub.Revive(
            service_pb2.ReviveRequest(
                proof=session.proof(auth.OP_REVIVE, auth.ids_body(blob)), ids=blob
            )
        )
        return wire.split_ids(reply.missing)
