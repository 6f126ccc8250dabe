"""The gRPC servicer: decodes requests, calls the repository, encodes replies.

It also enforces what the wire allows before anything reaches storage: the
session proof of every session request, id list sizes, and integers within
SQLite's range.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading

import grpc

from pysrbup import errors
from pysrbup._native import framing
from pysrbup.proto import service_pb2, service_pb2_grpc
from pysrbup.repo import auth, wire
from pysrbup.server.storage import Repository, Session

log = logging.getLogger("pysrbup.server")

SYNC_BATCH = 32768
#: A fetch reply frame is closed once it holds this much: a long request is
#: answered by a stream of alike, small frames, which the client opens while the
#: next ones are on the way (and its allocator reuses for the next ones).
FETCH_FRAME_BYTES = 1024 * 1024
#: UploadRaw makes received data durable (fsync; the index follows in batches, see
#: sessions.py) at least this often: half of what a client may leave unacknowledged.
UPLOAD_SYNC_BYTES = wire.UPLOAD_WINDOW_BYTES // 2
UPLOAD_SYNC_OBJECTS = wire.UPLOAD_WINDOW_OBJECTS // 2
#: ... and when the client pauses: no frame came for this long. Syncing whenever the
#: inbox ran dry, as before, made ~200 syncs of ~3 MB for a 1.6 GB tree.
UPLOAD_PAUSE_SECONDS = 0.05
#: Frames received ahead of the pack writer (network receive overlaps writing and fsync).
UPLOAD_INBOX = 4
#: An upload stream that sends nothing for this long is ended (clients close idle streams).
UPLOAD_IDLE_SECONDS = 120.0

_PAUSE = object()  # what UploadRaw's loop takes when no frame came in time

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
    """Splits a request's concatenated ids, refusing malformed or oversized lists."""
    try:
        oids = wire.split_ids(blob)
    except ValueError as exc:
        raise errors.UsageError(str(exc)) from None
    if len(oids) > wire.MAX_IDS_PER_REQUEST:
        raise errors.UsageError(f"at most {wire.MAX_IDS_PER_REQUEST} ids per request")
    return oids


def u63(value: int, what: str) -> int:
    """``value`` if it fits SQLite's signed 64-bit integers; UsageError otherwise."""
    if not 0 <= value <= wire.MAX_U63:
        raise errors.UsageError(f"{what} is out of range")
    return value


class BackupServicer(service_pb2_grpc.BackupServicer):
    """Thin translation between the wire protocol and ``Repository``."""

    def __init__(self, repo: Repository):
        self.repo = repo

    def _session(self, proof: service_pb2.SessionProof, op: str, body: bytes) -> Session:
        return self.repo.session(
            proof.session_id, u63(proof.seq, "proof seq"), proof.signature, op, body
        )

    @_guarded
    def GetInfo(self, request, context):
        return service_pb2.InfoReply(
            repo_id=self.repo.repo_id,
            format_version=wire.FORMAT_VERSION,
            write_public_key=self.repo.write_public_key,
            destroy_public_key=self.repo.destroy_public_key,
            append_only=self.repo.append_only,
            id_log_epoch=self.repo.index.epoch,
            id_log_last_seq=self.repo.index.last_seq(),
        )

    @_guarded
    def InitRepository(self, request, context):
        self.repo.initialise(
            request.token,
            request.write_public_key,
            request.destroy_public_key,
            request.write_signature,
            request.destroy_signature,
        )
        return service_pb2.InitReply()

    @_guarded_stream
    def SyncIds(self, request, context):
        after = u63(request.after_seq, "after_seq")
        until = u63(request.until_seq, "until_seq") or wire.MAX_U63
        while True:
            rows = self.repo.index.log_after(after, SYNC_BATCH, until)
            if not rows:
                return
            after = rows[-1][0]
            yield service_pb2.IdBatch(
                ids=b"".join(oid for _, oid, _ in rows),
                ops=bytes(op for _, _, op in rows),
                last_seq=after,
            )

    @_guarded
    def HasObjects(self, request, context):
        return service_pb2.HasObjectsReply(present=self.repo.has_objects(split_ids(request.ids)))

    @_guarded
    def GetChallenge(self, request, context):
        return service_pb2.ChallengeReply(challenge=self.repo.new_challenge())

    @_guarded
    def BeginSession(self, request, context):
        session_id = self.repo.begin_session(
            request.challenge, request.session_public_key, request.signature
        )
        return service_pb2.BeginSessionReply(session_id=session_id)

    def UploadRaw(self, request_iterator, context):
        """Raw-bytes upload stream: each request is one frame, each reply a ``wire.UPLOAD_ACK``.

        The stream's metadata carries a session proof; the stream then becomes
        the session's only writer (a newer stream supersedes it). A receiver
        thread reads frames ahead while this one appends them to the session's
        pack; every ``UPLOAD_SYNC_BYTES`` or ``UPLOAD_SYNC_OBJECTS`` (or when the
        client pauses for ``UPLOAD_PAUSE_SECONDS``) the session is synced and
        the frames so far acknowledged, so durability never stops the stream
        and an interrupted client re-sends only what was not acknowledged. On
        failure only this stream's unsynced records are rolled back.
        """
        meta = dict(context.invocation_metadata())
        try:
            seq = int(meta.get(wire.SESSION_SEQ_KEY, "-1"))
            proof = service_pb2.SessionProof(
                session_id=str(meta.get(wire.SESSION_KEY, "")),
                seq=u63(seq, "proof seq"),
                signature=bytes(meta.get(wire.SESSION_PROOF_KEY, b"")),
            )
            session = self._session(proof, auth.OP_UPLOAD, b"")
            stream = self.repo.open_stream(session)
        except (ValueError, errors.PysrbupError) as exc:
            if not isinstance(exc, errors.PysrbupError):
                exc = errors.UsageError("malformed session proof")
            _abort(context, exc)
            return
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
        frames = stored = dropped = stored_bytes = unsynced = unsynced_objects = 0
        clean = False
        try:
            while True:
                try:
                    wait = UPLOAD_PAUSE_SECONDS if unsynced else UPLOAD_IDLE_SECONDS
                    item = inbox.get(timeout=wait)
                except queue.Empty:
                    if not unsynced:
                        raise errors.ConflictError(
                            "the upload stream was idle for too long"
                        ) from None
                    item = _PAUSE
                if isinstance(item, Exception):
                    raise item
                if item is not None and item is not _PAUSE:
                    counts = self.repo.append(session, stream, framing.unpack_records(item))
                    frames += 1
                    unsynced += len(item)
                    unsynced_objects += counts.stored + counts.dropped
                    stored += counts.stored
                    dropped += counts.dropped
                    stored_bytes += counts.bytes_stored
                if (
                    item is None
                    or item is _PAUSE
                    or unsynced >= UPLOAD_SYNC_BYTES
                    or unsynced_objects >= UPLOAD_SYNC_OBJECTS
                ):
                    self.repo.sync(session, stream, index=item is None)
                    self.repo.counters.add(upload_bytes=unsynced)  # once per sync, not per frame
                    unsynced = unsynced_objects = 0
                    yield wire.UPLOAD_ACK.pack(frames, stored, dropped, stored_bytes)
                if item is None:
                    clean = True
                    return
        except (errors.PysrbupError, framing.FrameError) as exc:
            self.repo.rollback(session, stream)
            clean = True
            _abort(context, exc)
        finally:
            stop.set()
            self.repo.counters.add(upload_bytes=unsynced)  # received, if never made durable
            if not clean:  # client gone mid-stream: nothing unacknowledged is kept
                self.repo.rollback(session, stream)

    @_guarded
    def PutSessionKey(self, request, context):
        session = self._session(
            request.proof, auth.OP_PUT_KEY, auth.put_key_body(request.key_id, request.wrapped)
        )
        self.repo.put_session_key(session, request.key_id, request.wrapped)
        return service_pb2.PutSessionKeyReply()

    @_guarded_stream
    def ListSessionKeys(self, request, context):
        for key_id, wrapped in self.repo.session_keys():
            yield service_pb2.SessionKey(key_id=key_id, wrapped=wrapped)

    @_guarded
    def CommitSnapshot(self, request, context):
        checked = u63(request.checked_seq, "checked_seq")
        body = auth.commit_body(request.snapshot_id, request.record, checked)
        try:
            session = self._session(request.proof, auth.OP_COMMIT, body)
        except errors.NotFoundError:
            # A retried commit whose reply was lost finds its session ended: the
            # record it stored is the answer (nothing is written or ended here).
            if request.record and self.repo.committed_record(request.snapshot_id) == request.record:
                return service_pb2.CommitSnapshotReply(snapshot_id=request.snapshot_id)
            raise
        snapshot_id = self.repo.commit_snapshot(
            session, request.snapshot_id, request.record, checked
        )
        return service_pb2.CommitSnapshotReply(snapshot_id=snapshot_id)

    @_guarded
    def EndSession(self, request, context):
        self.repo.end_session(self._session(request.proof, auth.OP_END, b""))
        return service_pb2.EndSessionReply()

    @_guarded_stream
    def ListSnapshots(self, request, context):
        for stored in self.repo.snapshots():
            yield service_pb2.SnapshotInfo(
                snapshot_id=stored.snapshot_id,
                created_ns=stored.created_ns,
                stored_bytes=stored.stored_bytes,
                record=stored.record,
            )

    @_guarded_stream
    def FetchRaw(self, request, context):
        """Fetch over the raw-bytes method: the request is the concatenated ids,
        each reply one frame whose records carry a ``wire.FETCH_*`` status."""
        batch: list = []
        size = 0
        overhead = framing.RECORD_OVERHEAD
        for record in self.repo.fetch(split_ids(request)):
            batch.append(record)
            size += len(record[2]) + overhead
            if size >= FETCH_FRAME_BYTES:
                frame = framing.pack_records(batch)
                self.repo.counters.add(fetch_bytes=len(frame))
                yield frame
                batch, size = [], 0
        if batch:
            frame = framing.pack_records(batch)
            self.repo.counters.add(fetch_bytes=len(frame))
            yield frame

    @_guarded
    def DeleteSnapshot(self, request, context):
        already = self.repo.delete_snapshot(
            request.snapshot_id, request.challenge, request.signature
        )
        return service_pb2.DeleteSnapshotReply(already_deleted=already)

    @_guarded
    def Condemn(self, request, context):
        count, freed, pending = self.repo.condemn(
            split_ids(request.ids), request.snapshot_set, request.challenge, request.signature
        )
        return service_pb2.CondemnReply(condemned=count, bytes_freed=freed, bytes_pending=pending)

    @_guarded
    def GetStats(self, request, context):
        return service_pb2.StatsReply(**self.repo.stats())

    @_guarded
    def Revive(self, request, context):
        session = self._session(request.proof, auth.OP_REVIVE, auth.ids_body(request.ids))
        missing = self.repo.revive(session, split_ids(request.ids))
        return service_pb2.ReviveReply(missing=b"".join(missing))
