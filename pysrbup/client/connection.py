"""The client's side of the wire: one gRPC channel and typed calls on it.

Every gRPC failure becomes a ``PysrbupError`` with a one-line message, so
the rest of the client never sees ``grpc.RpcError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from pysrbup import errors
from pysrbup._native import framing
from pysrbup.proto import service_pb2, service_pb2_grpc

MAX_MESSAGE_BYTES = 80 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
#: Raw-bytes methods (no protobuf around bulk data; see server/serve.py).
UPLOAD_RAW = "/pysrbup.proto.BackupRaw/Upload"
FETCH_RAW = "/pysrbup.proto.BackupRaw/Fetch"
UPLOAD_SESSION_KEY = "pysrbup-session"


def _translate(exc: grpc.RpcError, address: str) -> errors.PysrbupError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.ServerUnavailableError(
            f"lost or could not make the connection to the server at {address}"
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFoundError(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDeniedError(f"server refused: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.StorageFullError(f"server: {details}")
    if code == grpc.StatusCode.ABORTED:
        return errors.ConflictError(f"server: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return errors.ServerUnavailableError(f"the request to {address} was cancelled")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.ServerUnavailableError(f"the server at {address} did not answer in time")
    return errors.ServerError(f"server error ({code.name if code else 'unknown'}): {details}")


class Connection:
    """A channel to one pysrbup server."""

    def __init__(self, address: str, timeout: float = CONNECT_TIMEOUT):
        self.address = address
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Reconnect quickly after a server restart (retries back off on their own).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._upload_raw = self._channel.stream_stream(UPLOAD_RAW)
        self._fetch_raw = self._channel.unary_stream(FETCH_RAW)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise errors.ServerUnavailableError(
                f"cannot reach the server at {address} (is pysrbup-server running?)"
            ) from None
        self._stub = service_pb2_grpc.BackupStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from None

    def _stream(self, method: str, request) -> Iterator:
        try:
            yield from getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from None

    def info(self) -> service_pb2.InfoReply:
        return self._call("GetInfo", service_pb2.InfoRequest())

    def register_key(self, public_key: bytes) -> bytes:
        reply = self._call(
            "RegisterKey", service_pb2.RegisterKeyRequest(auth_public_key=public_key)
        )
        return reply.auth_public_key

    def sync_ids(self, after_seq: int) -> Iterator[service_pb2.IdBatch]:
        return self._stream("SyncIds", service_pb2.SyncRequest(after_seq=after_seq))

    def begin_session(self) -> str:
        return self._call("BeginSession", service_pb2.BeginSessionRequest()).session_id

    def upload_frames(self, session_id: str, frames: Iterator[bytes]):
        """Starts a raw upload stream of frames; returns (call, acks).

        Each ack is the raw reply ``servicer.UPLOAD_ACK``: frames of this call
        made durable so far, and counts. ``call.cancel()`` abandons the stream.
        """
        call = self._upload_raw(frames, metadata=((UPLOAD_SESSION_KEY, session_id),))

        def acks() -> Iterator[bytes]:
            try:
                yield from call
            except grpc.RpcError as exc:
                raise _translate(exc, self.address) from None

        return call, acks()

    def fetch_frames(self, oids: list[bytes]) -> Iterator[tuple[bytes, int, memoryview]]:
        """Yields (id, status, envelope) for ``oids`` in the server's (pack) order.

        Status 0 found, 1 missing, 2 damaged. Frames travel over the raw-bytes
        method, with no protobuf around bulk data.
        """
        try:
            for frame in self._fetch_raw(b"".join(oids)):
                try:
                    records = framing.unpack_records(frame)
                except framing.FrameError as exc:
                    raise errors.IntegrityError(
                        f"the server sent a malformed frame: {exc}"
                    ) from None
                for oid, status, payload in records:
                    yield bytes(oid), status, payload
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from None

    def put_session_key(self, key_id: bytes, wrapped: bytes) -> None:
        self._call("PutSessionKey", service_pb2.SessionKey(key_id=key_id, wrapped=wrapped))

    def session_keys(self) -> dict[bytes, bytes]:
        return {
            k.key_id: k.wrapped
            for k in self._stream("ListSessionKeys", service_pb2.ListSessionKeysRequest())
        }

    def commit_snapshot(
        self, session_id: str, snapshot_id: str, record: bytes, checked_seq: int
    ) -> str:
        request = service_pb2.CommitSnapshotRequest(
            session_id=session_id, snapshot_id=snapshot_id, record=record, checked_seq=checked_seq
        )
        return self._call("CommitSnapshot", request).snapshot_id

    def end_session(self, session_id: str) -> None:
        with contextlib.suppress(errors.PysrbupError):
            self._call("EndSession", service_pb2.EndSessionRequest(session_id=session_id))

    def snapshots(self) -> list[service_pb2.SnapshotInfo]:
        return list(self._stream("ListSnapshots", service_pb2.ListSnapshotsRequest()))

    def challenge(self) -> bytes:
        return self._call("GetChallenge", service_pb2.ChallengeRequest()).challenge

    def delete_snapshot(self, snapshot_id: str, challenge: bytes, signature: bytes) -> bool:
        """Deletes a snapshot record; True if it had been deleted before."""
        request = service_pb2.DeleteSnapshotRequest(
            snapshot_id=snapshot_id, challenge=challenge, signature=signature
        )
        return self._call("DeleteSnapshot", request).already_deleted

    def condemn(
        self, ids: bytes, generation: int, challenge: bytes, signature: bytes
    ) -> service_pb2.CondemnReply:
        request = service_pb2.CondemnRequest(
            ids=ids, snapshot_generation=generation, challenge=challenge, signature=signature
        )
        return self._call("Condemn", request)

    def revive(self, session_id: str, oids: list[bytes]) -> list[bytes]:
        """Revives condemned ids; returns those already gone."""
        reply = self._call(
            "Revive", service_pb2.ReviveRequest(session_id=session_id, ids=b"".join(oids))
        )
        blob = reply.missing
        return [blob[i : i + 32] for i in range(0, len(blob), 32)]
