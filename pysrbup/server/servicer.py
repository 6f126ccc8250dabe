"""The gRPC servicer: decodes requests, calls the repository, encodes replies."""

from __future__ import annotations

import functools
import logging
import queue
import struct
import threading

import grpc

from pysrbup import errors
from pysrbup._native import framing
from pysrbup.proto import service_pb2, service_pb2_grpc
from pysrbup.server.storage import Repository

log = logging.getLogger("pysrbup.server")

ID_SIZE = 32
SYNC_BATCH = 32768
FETCH_FRAME_BYTES = 8 * 1024 * 1024
MAX_FETCH_IDS = 65536
#: UploadRaw reply: frames of the call now durable, objects stored, dropped, bytes stored.
UPLOAD_ACK = struct.Struct("<QQQQ")
#: UploadRaw makes received data durable (fsync + index commit) at least this often.
UPLOAD_SYNC_BYTES = 16 * 1024 * 1024
#: Frames received ahead of the pack writer (network receive overlaps writing and fsync).
UPLOAD_INBOX = 4
UPLOAD_SESSION_KEY = "pysrbup-session"

_STATUS = {
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.StorageFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UsageError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RepositoryError: grpc.StatusCode.INTERNAL,
    errors.ConflictError: grpc.StatusCode.ABORTED,
}


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code = grpc.StatusCode.INTERNAL
    for kind, status in _STATUS.items():
        if isinstance(exc, kind):
            code = status
            break
    if isinstance(exc, framing.FrameError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed: %s", exc)
    context.abort(code, str(exc))


def _guarded(method):
    """Turns pysrbup errors into gRPC statuses with their one-line message."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except (errors.PysrbupError, framing.FrameError) as exc:
            _abort(context, exc)

    return wrapper


def _guarded_stream(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except (errors.PysrbupError, framing.FrameError) as exc:
            _abort(context, exc)

    return wrapper


def split_ids(blob: bytes) -> list[bytes]:
    """Splits concatenated 32-byte ids."""
    if len(blob) % ID_SIZE:
        raise errors.UsageError("id list length is not a multiple of 32")
    return [blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)]


class BackupServicer(service_pb2_grpc.BackupServicer):
    """Thin translation between the wire protocol and ``Repository``."""

    def __init__(self, repo: Repository):
        self.repo = repo

    @_guarded
    def GetInfo(self, request, context):
        return service_pb2.InfoReply(
            repo_id=self.repo.repo_id,
            format_version=1,
            auth_public_key=self.repo.auth_public_key,
            append_only=self.repo.append_only,
            id_log_epoch=self.repo.index.epoch,
            snapshot_generation=self.repo.generation,
        )

    @_guarded
    def RegisterKey(self, request, context):
        key = self.repo.register_key(request.auth_public_key)
        return service_pb2.RegisterKeyReply(auth_public_key=key)

    @_guarded_stream
    def SyncIds(self, request, context):
        after = request.after_seq
        while True:
            rows = self.repo.index.log_after(after, SYNC_BATCH)
            if not rows:
                return
            after = rows[-1][0]
            yield service_pb2.IdBatch(
                ids=b"".join(oid for _, oid, _ in rows),
                ops=bytes(op for _, _, op in rows),
                last_seq=after,
            )

    @_guarded
    def BeginSession(self, request, context):
        return service_pb2.BeginSessionReply(session_id=self.repo.begin_session())

    def Upload(self, request_iterator, context):
        session_id = ""
        stored = dropped = stored_bytes = 0
        try:
            for message in request_iterator:
                if message.session_id:
                    session_id = message.session_id
                if not session_id:
                    raise errors.UsageError("upload without a session")
                records = framing.unpack_records(message.frame)
                counts = self.repo.append(session_id, records)
                stored += counts.stored
                dropped += counts.dropped
                stored_bytes += counts.bytes_stored
            if session_id:
                self.repo.sync(session_id)
        except (errors.PysrbupError, framing.FrameError) as exc:
            if session_id:
                self.repo.rollback(session_id)
            _abort(context, exc)
        except Exception:
            # The client went away mid-stream: nothing unacknowledged is kept.
            if session_id:
                self.repo.rollback(session_id)
            raise
        return service_pb2.UploadReply(
            objects_stored=stored, objects_dropped=dropped, bytes_stored=stored_bytes
        )

    def UploadRaw(self, request_iterator, context):
        """Raw-bytes upload stream: each request is one frame, each reply an ``UPLOAD_ACK``.

        A receiver thread reads frames ahead while this one appends them to the
        session's pack; every ``UPLOAD_SYNC_BYTES`` (or when the client pauses)
        the session is synced and the frames so far acknowledged, so durability
        never stops the stream and an interrupted client re-sends only what was
        not acknowledged. Whatever was not synced is rolled back on failure.
        """
        session_id = dict(context.invocation_metadata()).get(UPLOAD_SESSION_KEY, "")
        if not session_id:
            _abort(context, errors.UsageError("upload without a session"))
        inbox: queue.Queue = queue.Queue(maxsize=UPLOAD_INBOX)
        stop = threading.Event()

        def receive() -> None:
            try:
                for frame in request_iterator:
                    while not stop.is_set():
                        try:
                            inbox.put(frame, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                inbox.put(None)
            except Exception as exc:  # the client went away or cancelled
                inbox.put(exc)

        threading.Thread(target=receive, name="pysrbup-receive", daemon=True).start()
        frames = stored = dropped = stored_bytes = unsynced = 0
        clean = False
        try:
            while True:
                item = inbox.get()
                if isinstance(item, Exception):
                    raise item
                if item is not None:
                    counts = self.repo.append(session_id, framing.unpack_records(item))
                    frames += 1
                    unsynced += len(item)
                    stored += counts.stored
                    dropped += counts.dropped
                    stored_bytes += counts.bytes_stored
                if item is None or unsynced >= UPLOAD_SYNC_BYTES or (unsynced and inbox.empty()):
                    self.repo.sync(session_id)
                    unsynced = 0
                    yield UPLOAD_ACK.pack(frames, stored, dropped, stored_bytes)
                if item is None:
                    clean = True
                    return
        except (errors.PysrbupError, framing.FrameError) as exc:
            self.repo.rollback(session_id)
            clean = True
            _abort(context, exc)
        finally:
            stop.set()
            if not clean:  # client gone mid-stream: nothing unacknowledged is kept
                self.repo.rollback(session_id)

    @_guarded
    def PutSessionKey(self, request, context):
        self.repo.put_session_key(request.key_id, request.wrapped)
        return service_pb2.PutSessionKeyReply()

    @_guarded_stream
    def ListSessionKeys(self, request, context):
        for key_id, wrapped in self.repo.session_keys():
            yield service_pb2.SessionKey(key_id=key_id, wrapped=wrapped)

    @_guarded
    def CommitSnapshot(self, request, context):
        snapshot_id = self.repo.commit_snapshot(
            request.session_id, request.snapshot_id, request.record, request.checked_seq
        )
        return service_pb2.CommitSnapshotReply(snapshot_id=snapshot_id)

    @_guarded
    def EndSession(self, request, context):
        self.repo.end_session(request.session_id)
        return service_pb2.EndSessionReply()

    @_guarded_stream
    def ListSnapshots(self, request, context):
        yield from self.repo.snapshots()

    def _fetch_frames(self, ids: bytes):
        oids = split_ids(ids)
        if len(oids) > MAX_FETCH_IDS:
            raise errors.UsageError(f"at most {MAX_FETCH_IDS} ids per fetch")
        batch: list = []
        size = 0
        for record in self.repo.fetch(oids):
            batch.append(record)
            size += len(record[2]) + framing.RECORD_OVERHEAD
            if size >= FETCH_FRAME_BYTES:
                yield bytes(framing.pack_records(batch))
                batch, size = [], 0
        if batch:
            yield bytes(framing.pack_records(batch))

    @_guarded_stream
    def Fetch(self, request, context):
        for frame in self._fetch_frames(request.ids):
            yield service_pb2.FetchFrame(frame=frame)

    @_guarded_stream
    def FetchRaw(self, request, context):
        """Fetch over the raw-bytes method: the request is the concatenated ids,
        each reply one frame (no protobuf around bulk data)."""
        yield from self._fetch_frames(request)

    @_guarded
    def GetChallenge(self, request, context):
        return service_pb2.ChallengeReply(challenge=self.repo.new_challenge())

    @_guarded
    def DeleteSnapshot(self, request, context):
        already = self.repo.delete_snapshot(
            request.snapshot_id, request.challenge, request.signature
        )
        return service_pb2.DeleteSnapshotReply(already_deleted=already)

    @_guarded
    def Condemn(self, request, context):
        count, freed, pending = self.repo.condemn(
            split_ids(request.ids),
            request.snapshot_generation,
            request.challenge,
            request.signature,
        )
        return service_pb2.CondemnReply(condemned=count, bytes_freed=freed, bytes_pending=pending)

    @_guarded
    def Revive(self, request, context):
        missing = self.repo.revive(request.session_id, split_ids(request.ids))
        return service_pb2.ReviveReply(missing=b"".join(missing))
