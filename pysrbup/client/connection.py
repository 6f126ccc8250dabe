"""The client's side of the wire: one gRPC channel and typed calls on it.

Every gRPC failure becomes a ``PysrbupError`` with a one-line message, so
the rest of the client never sees ``grpc.RpcError``. Nothing waits on the
server forever: unary calls carry a deadline, streams are cancelled when no
message arrives for as long, keepalive pings notice a dead peer, and a
stream's length is bounded by what the server announced.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import grpc

from pysrbup import envvars, errors
from pysrbup._native import framing
from pysrbup.proto import service_pb2, service_pb2_grpc
from pysrbup.repo import wire

#: How long to try reaching the server (it may be starting): PYSRBUP_CONNECT_TIMEOUT seconds.
CONNECT_TIMEOUT = envvars.seconds("PYSRBUP_CONNECT_TIMEOUT", 10.0)
#: Longest wait for one reply (or the next message of a stream): PYSRBUP_TIMEOUT seconds.
RPC_TIMEOUT = envvars.seconds("PYSRBUP_TIMEOUT", 120.0)
#: A listing of more snapshot records than this is refused (a lying server's endless stream).
MAX_SNAPSHOTS = 1_000_000
MAX_LISTING_BYTES = 1024 * 1024 * 1024
_SNAPSHOT_ID = re.compile(f"[0-9a-f]{{{wire.SNAPSHOT_ID_HEX}}}")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    # Reconnect quickly after a server restart (retries back off on their own).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Ping a silent connection so a vanished server is noticed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _translate(exc: grpc.RpcError, address: str, stalled: bool = False) -> errors.PysrbupError:
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
    if code == grpc.StatusCode.CANCELLED and stalled:
        return errors.ServerUnavailableError(
            f"the server at {address} stopped answering (nothing for {RPC_TIMEOUT:.0f} s; "
            "PYSRBUP_TIMEOUT sets the limit)"
        )
    if code == grpc.StatusCode.CANCELLED:
        return errors.ServerUnavailableError(f"the request to {address} was cancelled")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.ServerUnavailableError(
            f"the server at {address} did not answer within {RPC_TIMEOUT:.0f} s "
            "(PYSRBUP_TIMEOUT sets the limit)"
        )
    return errors.ServerError(f"server error ({code.name if code else 'unknown'}): {details}")


class _Watchdog:
    """Cancels stream calls that receive nothing for ``RPC_TIMEOUT`` seconds."""

    def __init__(self) -> None:
        self._calls: dict[int, list] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, call) -> int:
        with self._lock:
            self._next += 1
            self._calls[self._next] = [call, time.monotonic(), False]
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pysrbup-watchdog", daemon=True
                )
                self._thread.start()
            return self._next

    def touch(self, token: int) -> None:
        with self._lock:
            entry = self._calls.get(token)
            if entry is not None:
                entry[1] = time.monotonic()

    def done(self, token: int) -> bool:
        """Stops watching; True if the watchdog had cancelled the call."""
        with self._lock:
            entry = self._calls.pop(token, None)
        return bool(entry and entry[2])

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, RPC_TIMEOUT / 4)):
            now = time.monotonic()
            with self._lock:
                stale = [e for e in self._calls.values() if not e[2] and now - e[1] > RPC_TIMEOUT]
                for entry in stale:
                    entry[2] = True
            for entry in stale:
                entry[0].cancel()

    def close(self) -> None:
        self._stop.set()


class Connection:
    """A channel to one pysrbup server."""

    def __init__(
        self,
        address: str,
        timeout: float = CONNECT_TIMEOUT,
        *,
        plaintext: bool = False,
        tls_ca: str | None = None,
        tls_fingerprint: str | None = None,
        config_dir: str | None = None,
    ):
        """TLS by default, the certificate pinned in ``config_dir`` (see client/tls.py)."""
        from pysrbup.client import tls

        self.address = address
        deadline = time.monotonic() + timeout
        security = tls.channel_security(
            address,
            plaintext=plaintext,
            tls_ca=tls_ca,
            tls_fingerprint=tls_fingerprint,
            directory=config_dir,
            timeout=timeout,
        )
        if security.credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                address, security.credentials, options=[*CHANNEL_OPTIONS, *security.options]
            )
        self._upload_raw = self._channel.stream_stream(wire.UPLOAD_RAW)
        self._fetch_raw = self._channel.unary_stream(wire.FETCH_RAW)
        self._stub = service_pb2_grpc.BackupStub(self._channel)
        # Connected once a GetInfo is answered. (Not grpc.channel_ready_future: its
        # polling thread makes closing the channel take 200 ms, a third of a small restore.)
        try:
            try:
                answered = self._probe(min(1.0, deadline - time.monotonic()), wait=False)
            except grpc.FutureTimeoutError:
                answered = self._connected()
                if answered:  # connected, but slow to answer: as long as any call may take
                    self._probe(RPC_TIMEOUT)
            if not answered:
                # Not up at the first try or within a second: a server that is starting,
                # or one in the other mode (TLS or plaintext) or with another certificate,
                # which is named now instead of after the whole timeout.
                security.diagnose()
                self._probe(deadline - time.monotonic())
        except grpc.FutureTimeoutError:
            connected = self._connected()
            self._channel.close()
            if connected:
                raise errors.ServerUnavailableError(
                    f"the server at {address} did not answer within {RPC_TIMEOUT:.0f} s "
                    "(PYSRBUP_TIMEOUT sets the limit)"
                ) from None
            raise errors.ServerUnavailableError(
                f"cannot reach the server at {address} (is pysrbup-server running?)"
            ) from None
        except BaseException:
            self._channel.close()
            raise
        self._watchdog = _Watchdog()

    def _connected(self) -> bool:
        """Whether the channel is up (slow paths only: this starts gRPC's polling thread)."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=0.05)
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()  # unsubscribes: the polling thread leaves at its next turn
            self._await_poller()
        return True

    def _await_poller(self) -> None:
        """Waits (up to 1 s) for gRPC's connectivity polling thread to leave.

        It looks at the channel every 0.2 s until it notices nobody is subscribed;
        a channel closed before that makes it die with a traceback on stderr
        ("ValueError: Cannot invoke RPC: Channel closed!"). gRPC offers no way to
        join it, so its state's ``polling`` flag is watched (without it: no wait).
        """
        state = getattr(self._channel, "_connectivity_state", None)
        deadline = time.monotonic() + 1.0
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _probe(self, seconds: float, wait: bool = True) -> bool:
        """Waits up to ``seconds`` for the channel to answer; FutureTimeoutError if not.

        With ``wait`` False, a first connection attempt that fails returns False at once.
        """
        try:
            self._stub.GetInfo(
                service_pb2.InfoRequest(), timeout=max(0.01, seconds), wait_for_ready=wait
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise grpc.FutureTimeoutError() from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not wait:
                return False
            # Connected, but the call failed (an old server, a refusal): the calls that
            # follow report it in their own words.
        return True

    def close(self) -> None:
        self._watchdog.close()
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from None

    def watched(self, call) -> Iterator:
        """The messages of a stream ``call``, cancelled if the server stalls between them."""
        token = self._watchdog.watch(call)
        finished = False
        try:
            for message in call:
                self._watchdog.touch(token)
                yield message
                del message  # not held while waiting for the next (a frame's memory)
            finished = True
        except grpc.RpcError as exc:
            finished = True
            raise _translate(exc, self.address, self._watchdog.done(token)) from None
        finally:
            self._watchdog.done(token)
            if not finished:  # the caller stopped reading: free the server's worker
                call.cancel()

    def _stream(self, method: str, request) -> Iterator:
        return self.watched(getattr(self._stub, method)(request))

    def info(self) -> service_pb2.InfoReply:
        """The server's GetInfo reply; RepositoryError if it speaks another format."""
        reply = self._call("GetInfo", service_pb2.InfoRequest())
        if reply.format_version != wire.FORMAT_VERSION:
            raise errors.RepositoryError(
                f"the server at {self.address} keeps repository format {reply.format_version}, "
                f"this pysrbup reads format {wire.FORMAT_VERSION} only: use a pysrbup release "
                f"that reads format {reply.format_version}"
            )
        return reply

    def init_repository(self, request: service_pb2.InitRequest) -> None:
        self._call("InitRepository", request)

    def sync_ids(self, after_seq: int, until_seq: int) -> Iterator[service_pb2.IdBatch]:
        """Id-log batches after ``after_seq`` up to ``until_seq`` (what GetInfo announced).

        Sequence numbers must grow and stay within the announced range, so a
        lying server cannot make the client read (and cache) without end.
        """
        last = after_seq
        if until_seq <= after_seq:
            return
        request = service_pb2.SyncRequest(after_seq=after_seq, until_seq=until_seq)
        for batch in self._stream("SyncIds", request):
            count = len(batch.ids) // wire.ID_SIZE
            if (
                len(batch.ids) % wire.ID_SIZE
                or len(batch.ops) != count
                or batch.last_seq < last + count
                or batch.last_seq > until_seq
            ):
                raise errors.IntegrityError("the server sent a malformed id log")
            last = batch.last_seq
            yield batch
            if last >= until_seq:
                return

    def has_objects(self, oids: list[bytes]) -> list[bool]:
        """Whether the repository stores each of ``oids`` (at most MAX_IDS_PER_REQUEST)."""
        reply = self._call("HasObjects", service_pb2.HasObjectsRequest(ids=b"".join(oids)))
        if len(reply.present) != len(oids):
            raise errors.IntegrityError("the server answered an existence query malformed")
        return [bool(flag) for flag in reply.present]

    def challenge(self) -> bytes:
        return self._call("GetChallenge", service_pb2.ChallengeRequest()).challenge

    def begin_session(self, challenge: bytes, session_public: bytes, signature: bytes) -> str:
        request = service_pb2.BeginSessionRequest(
            challenge=challenge, session_public_key=session_public, signature=signature
        )
        session_id = self._call("BeginSession", request).session_id
        if len(session_id) != wire.SESSION_ID_HEX or not session_id.isalnum():
            raise errors.IntegrityError("the server sent a malformed session id")
        return session_id

    def upload_frames(self, metadata: tuple, frames: Iterator[bytes]):
        """Starts a raw upload stream of frames; returns (call, acks).

        ``metadata`` carries the session proof (see ``WriteSession.upload_metadata``).
        Each ack is a raw ``wire.UPLOAD_ACK``: frames of this call made durable
        so far, and counts. ``call.cancel()`` abandons the stream; a server
        that stops acknowledging is cancelled after ``RPC_TIMEOUT``.
        """
        call = self._upload_raw(frames, metadata=metadata)
        return call, self.watched(call)

    def fetch_frames(self, oids: list[bytes]) -> Iterator[tuple[bytes, int, memoryview]]:
        """Yields (id, ``wire.FETCH_*`` status, envelope) for ``oids`` in the server's order.

        Frames travel over the raw-bytes method, with no protobuf around bulk
        data. Only ids asked for are passed on, each once.
        """
        for _, records in self.fetch_frame_records(oids):
            yield from records

    def fetch_frame_records(
        self, oids: list[bytes]
    ) -> Iterator[tuple[int, list[tuple[bytes, int, memoryview]]]]:
        """Per reply frame: (its size, its records as in ``fetch_frames``).

        The payloads are views into the frame: the frame's memory lives as long
        as any of them, which lets a caller bound the bytes it holds. The
        generator keeps no reference of its own while suspended.
        """
        unique = list(dict.fromkeys(oids))
        wanted = set(unique)
        for frame in self.watched(self._fetch_raw(b"".join(unique))):
            size = len(frame)
            try:
                raw = framing.unpack_records(frame)
            except framing.FrameError as exc:
                raise errors.IntegrityError(f"the server sent a malformed frame: {exc}") from None
            del frame
            records = []
            payload = None
            for oid, status, payload in raw:
                oid = bytes(oid)
                if oid not in wanted:
                    raise errors.IntegrityError("the server sent an object that was not asked for")
                wanted.discard(oid)
                records.append((oid, status, payload))
            del raw, payload
            yield size, records
            del records

    def put_session_key(self, proof: service_pb2.SessionProof, key_id: bytes, wrapped: bytes):
        request = service_pb2.PutSessionKeyRequest(proof=proof, key_id=key_id, wrapped=wrapped)
        self._call("PutSessionKey", request)

    def session_keys(self) -> dict[bytes, bytes]:
        keys = {}
        for k in self._stream("ListSessionKeys", service_pb2.ListSessionKeysRequest()):
            keys[k.key_id] = k.wrapped
            if len(keys) > MAX_SNAPSHOTS:
                raise errors.IntegrityError("the server lists more session keys than it can hold")
        return keys

    def commit_snapshot(
        self,
        proof: service_pb2.SessionProof,
        snapshot_id: str,
        record: bytes,
        checked_seq: int,
    ) -> str:
        request = service_pb2.CommitSnapshotRequest(
            proof=proof, snapshot_id=snapshot_id, record=record, checked_seq=checked_seq
        )
        return self._call("CommitSnapshot", request).snapshot_id

    def end_session(self, proof: service_pb2.SessionProof) -> None:
        with contextlib.suppress(errors.PysrbupError):
            self._call("EndSession", service_pb2.EndSessionRequest(proof=proof))

    def snapshots(self) -> list[service_pb2.SnapshotInfo]:
        """Every snapshot record; bounded in count and bytes."""
        infos = []
        seen: set[str] = set()
        total = 0
        for info in self._stream("ListSnapshots", service_pb2.ListSnapshotsRequest()):
            total += len(info.record)
            if len(infos) >= MAX_SNAPSHOTS or total > MAX_LISTING_BYTES:
                raise errors.IntegrityError("the server lists more backups than it can hold")
            if (
                not _SNAPSHOT_ID.fullmatch(info.snapshot_id)
                or info.snapshot_id in seen
                or len(info.record) > wire.MAX_SNAPSHOT_RECORD
            ):
                raise errors.IntegrityError("the server listed a malformed or duplicate backup")
            seen.add(info.snapshot_id)
            infos.append(info)
        return infos

    def delete_snapshot(self, snapshot_id: str, challenge: bytes, signature: bytes) -> bool:
        """Deletes a snapshot record; True if it had been deleted before."""
        request = service_pb2.DeleteSnapshotRequest(
            snapshot_id=snapshot_id, challenge=challenge, signature=signature
        )
        return self._call("DeleteSnapshot", request).already_deleted

    def condemn(
        self, ids: bytes, snapshot_set: bytes, challenge: bytes, signature: bytes
    ) -> service_pb2.CondemnReply:
        request = service_pb2.CondemnRequest(
            ids=ids, snapshot_set=snapshot_set, challenge=challenge, signature=signature
        )
        return self._call("Condemn", request)

    def stats(self) -> service_pb2.StatsReply:
        return self._call("GetStats", service_pb2.StatsRequest())

    def revive(self, proof: service_pb2.SessionProof, ids: bytes) -> list[bytes]:
        """Revives condemned ids (concatenated); returns those already gone."""
        reply = self._call("Revive", service_pb2.ReviveRequest(proof=proof, ids=ids))
        try:
            return wire.split_ids(reply.missing)
        except ValueError:
            raise errors.IntegrityError("the server answered a revive malformed") from None
