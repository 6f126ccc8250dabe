"""Streams sealed objects to the server in framed batches, acknowledged as they become durable.

Producers ``put`` (id, envelope) pairs from any thread. Every ``FRAME_BYTES``
of them become one frame, built by the framing kernel with a single copy of
each envelope into a ``bytes`` that gRPC sends as it is. One sender thread keeps a raw-bytes upload
stream open (``Connection.upload_frames``, no protobuf around the frames);
the server acknowledges frames once they are fsynced (durable), and for each
acknowledged frame the uploader calls ``on_durable`` with its ids, which is
what lets the files cache record a file only once all its chunks are stored.

At most ``wire.UPLOAD_WINDOW_BYTES`` of frames, holding at most ``wire.UPLOAD_WINDOW_OBJECTS``
objects, are unacknowledged at a time (producers block beyond that), which
bounds memory and what a failure can cost; the object bound matters for tiny
files, whose per-object state (ids, files-cache records waiting for
durability) outweighs their bytes. When the
stream breaks (server restart, network cut) the sender reconnects with
exponential backoff, begins a new session if the server forgot the old one
(through the ``SessionHolder`` it shares with the commit), and re-sends every
unacknowledged frame; a duplicate of an object the server already made
durable is simply dropped there. It gives up after ``retry_seconds`` without
progress. A stream with nothing to send for ``IDLE_STREAM_SECONDS`` is ended
(the server times idle streams out) and a new one opened when frames come.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pysrbup._native import framing
from pysrbup.client.connection import Connection
from pysrbup.client.retry import RETRY_SECONDS, TRANSIENT, Backoff
from pysrbup.client.session import SessionHolder
from pysrbup.errors import NotFoundError, PysrbupError, ServerUnavailableError
from pysrbup.repo.wire import UPLOAD_ACK, UPLOAD_WINDOW_BYTES, UPLOAD_WINDOW_OBJECTS

#: Frames of 2 MiB with a 16 MiB window backed the 976 MB compare set up as fast
#: as 4 MiB frames with a 24 MiB window, with a peak RSS of 113-117 MiB instead of
#: 123-127 and fewer page faults (the main process's heap holds the window).
FRAME_BYTES = 2 * 1024 * 1024
#: Objects per frame at most: a frame of tiny objects is cut before 2 MiB.
FRAME_OBJECTS = UPLOAD_WINDOW_OBJECTS // 4
#: A stream with nothing to send for this long is ended cleanly (see the module docstring).
IDLE_STREAM_SECONDS = 20.0


@dataclass
class UploadStats:
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_stored: int = 0
    objects_dropped: int = 0
    bytes_stored: int = 0
    retries: int = 0
    new_sessions: int = 0


@dataclass
class _Frame:
    data: bytes
    oids: list[bytes]
    payload_bytes: int


class Uploader:
    """One background upload stream for a backup."""

    def __init__(
        self,
        conn: Connection,
        sessions: SessionHolder,
        on_durable: Callable[[list[bytes]], None] | None = None,
        retry_seconds: float = RETRY_SECONDS,
        warn: Callable[[str], None] | None = None,
    ):
        self.conn = conn
        self.sessions = sessions
        self.stats = UploadStats()
        self.on_durable = on_durable
        self.retry_seconds = retry_seconds
        self.warn = warn or (lambda message: None)
        self._cv = threading.Condition()
        self._batch: list[tuple[bytes, object, Callable[[], None] | None]] = []
        self._batch_bytes = 0
        self._pending: deque[_Frame] = deque()  # built, not handed to a call
        self._inflight: deque[_Frame] = deque()  # handed to the current call, unacknowledged
        self._unacked = 0
        self._unacked_objects = 0
        self._closing = False
        self._generation = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pysrbup-upload", daemon=True)
        self._thread.start()

    # ---- producers -------------------------------------------------------------

    def put(self, oid: bytes, envelope, framed: Callable[[], None] | None = None) -> None:
        """Queues one object; blocks while the window is full; raises if uploading failed.

        ``envelope`` may be a view into memory the caller reuses: ``framed()``
        is called once it has been copied into a frame (by this call, or by a
        later ``put`` or ``flush``), after which the caller may reuse it.
        """
        with self._cv:
            if self._error is not None:
                raise self._failure()
            self._batch.append((oid, envelope, framed))
            self._batch_bytes += len(envelope) + framing.RECORD_OVERHEAD
            if self._batch_bytes < FRAME_BYTES and len(self._batch) < FRAME_OBJECTS:
                return
            batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._enqueue(batch)

    def _enqueue(self, batch: list[tuple[bytes, object, Callable[[], None] | None]]) -> None:
        data = framing.pack_records([(oid, 0, envelope) for oid, envelope, _ in batch])
        frame = _Frame(data, [oid for oid, _, _ in batch], sum(len(e) for _, e, _ in batch))
        for _, _, framed in batch:
            if framed is not None:
                framed()
        del batch
        with self._cv:
            while (
                self._unacked >= UPLOAD_WINDOW_BYTES
                or self._unacked_objects >= UPLOAD_WINDOW_OBJECTS
            ) and self._error is None:
                self._cv.wait(0.5)
            if self._error is not None:
                raise self._failure()
            self._pending.append(frame)
            self._unacked += len(frame.data)
            self._unacked_objects += len(frame.oids)
            self.stats.objects_sent += len(frame.oids)
            self.stats.bytes_sent += frame.payload_bytes
            self._cv.notify_all()

    def flush(self) -> None:
        """Sends the partial batch now (e.g. so that the files cache can record it)."""
        with self._cv:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
        if batch:
            self._enqueue(batch)

    def finish(self) -> UploadStats:
        """Waits until everything put is durable on the server."""
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._failure()
        return self.stats

    def abort(self) -> None:
        """Stops sending; what was not acknowledged is dropped by the server."""
        with self._cv:
            if self._error is None:
                self._error = PysrbupError("upload aborted")
            self._closing = True
            self._generation += 1
            self._cv.notify_all()
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()
        self._thread.join(timeout=10)

    def _failure(self) -> PysrbupError:
        if isinstance(self._error, PysrbupError):
            return self._error
        return ServerUnavailableError(f"upload failed: {self._error}")

    # ---- the sender ------------------------------------------------------------

    def _requests(self, generation: int):
        """The frames of one call; stops when the call is superseded, idle or all is sent."""
        while True:
            with self._cv:
                idle_since = time.monotonic()
                while not self._pending and not self._closing and self._generation == generation:
                    if time.monotonic() - idle_since > IDLE_STREAM_SECONDS:
                        return  # the server acknowledges what it has and the call ends
                    self._cv.wait(0.5)
                if self._generation != generation or (self._closing and not self._pending):
                    return
                frame = self._pending.popleft()
                self._inflight.append(frame)
            yield frame.data

    def _acknowledge(self, count: int) -> None:
        with self._cv:
            frames = [self._inflight.popleft() for _ in range(min(count, len(self._inflight)))]
            self._unacked -= sum(len(f.data) for f in frames)
            self._unacked_objects -= sum(len(f.oids) for f in frames)
            self._cv.notify_all()
        if self.on_durable is not None:
            for frame in frames:
                self.on_durable(frame.oids)

    def _done(self) -> bool:
        with self._cv:
            return self._closing and not self._pending and not self._inflight

    def _wait_for_work(self) -> None:
        with self._cv:
            while not self._pending and not self._closing and self._error is None:
                self._cv.wait(0.5)

    def _run(self) -> None:
        backoff = Backoff(self.retry_seconds)
        while True:
            self._wait_for_work()
            with self._cv:
                if self._error is not None:
                    return
                self._generation += 1
                generation = self._generation
            acked = stored = dropped = stored_bytes = 0
            session = self.sessions.current
            try:
                call, acks = self.conn.upload_frames(
                    session.upload_metadata(), self._requests(generation)
                )
                self._call = call
                for raw in acks:
                    frames, n_stored, n_dropped, n_bytes = UPLOAD_ACK.unpack(raw)
                    if frames > acked:
                        self._acknowledge(frames - acked)
                        acked = frames
                        backoff.progressed()
                    self.stats.objects_stored += n_stored - stored
                    self.stats.objects_dropped += n_dropped - dropped
                    self.stats.bytes_stored += n_bytes - stored_bytes
                    stored, dropped, stored_bytes = n_stored, n_dropped, n_bytes
                if self._done():
                    return
                with self._cv:
                    if self._error is not None:
                        return
                if self._inflight:
                    raise ServerUnavailableError("the upload stream ended before every frame")
            except TRANSIENT as exc:
                with self._cv:
                    if self._error is not None:
                        return
                if backoff.expired():
                    self._fail(exc)
                    return
                self._requeue()
                self.stats.retries += 1
                self.warn(f"{exc}; retrying in {backoff.delay:.1f} s")
                backoff.wait()
                if isinstance(exc, NotFoundError):  # the server forgot the session
                    try:
                        self.sessions.renew(session)
                        self.stats.new_sessions += 1
                    except ServerUnavailableError:
                        pass  # retried on the next round
            except BaseException as exc:
                self._fail(exc)
                return

    def _requeue(self) -> None:
        """Puts every unacknowledged frame back in front of the queue for the next call."""
        with self._cv:
            self._generation += 1
            self._pending.extendleft(reversed(self._inflight))
            self._inflight.clear()
            self._cv.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            self._error = exc
            self._cv.notify_all()
