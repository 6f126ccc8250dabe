"""Streams sealed objects to the server in large framed batches.

Producers ``put`` (id, envelope) pairs; one thread packs them into frames and
streams them in Upload calls of up to ``call_bytes`` each. A call returns
only once the server has made its objects durable, so ``finish`` returning
means every object put is stored.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from pysrbup._native import framing
from pysrbup.client.connection import Connection
from pysrbup.errors import PysrbupError, ServerUnavailableError

FRAME_BYTES = 4 * 1024 * 1024
CALL_BYTES = 128 * 1024 * 1024
QUEUE_ITEMS = 32
_DONE = object()


@dataclass
class UploadStats:
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_stored: int = 0
    objects_dropped: int = 0


class Uploader:
    """One background upload stream for a session."""

    def __init__(self, conn: Connection, session_id: str):
        self.conn = conn
        self.session_id = session_id
        self.stats = UploadStats()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="pysrbup-upload", daemon=True)
        self._thread.start()

    def put(self, oid: bytes, envelope) -> None:
        """Queues one object; blocks while the queue is full; raises if uploading failed."""
        while True:
            if self._error is not None:
                raise self._failure()
            try:
                self._queue.put((oid, envelope), timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> UploadStats:
        """Waits until everything put is durable on the server."""
        while self._thread.is_alive():
            if self._error is not None:
                break
            try:
                self._queue.put(_DONE, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None:
            raise self._failure()
        return self.stats

    def _failure(self) -> PysrbupError:
        if isinstance(self._error, PysrbupError):
            return self._error
        return ServerUnavailableError(f"upload failed: {self._error}")

    def _frames(self):
        batch: list = []
        size = call_size = 0
        while True:
            item = self._queue.get()
            if item is _DONE:
                self._closing = True
                break
            batch.append(item)
            size += len(item[1]) + framing.RECORD_OVERHEAD
            if size >= FRAME_BYTES:
                yield self._pack(batch)
                call_size += size
                batch, size = [], 0
                if call_size >= CALL_BYTES:
                    return
        if batch:
            yield self._pack(batch)

    def _pack(self, batch: list) -> bytes:
        frame = framing.pack_records([(oid, 0, env) for oid, env in batch])
        self.stats.objects_sent += len(batch)
        self.stats.bytes_sent += sum(len(env) for _, env in batch)
        return bytes(frame)

    def _run(self) -> None:
        try:
            while not self._closing:
                reply = self.conn.upload(self.session_id, self._frames())
                self.stats.objects_stored += reply.objects_stored
                self.stats.objects_dropped += reply.objects_dropped
        except BaseException as exc:
            self._error = exc
            while True:  # unblock producers waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
