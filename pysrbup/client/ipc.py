"""Forked children and the message channels between them and the main process.

What a backup's workers need of ``multiprocessing`` (a forked process, a duplex
pipe of pickled messages, waiting on several pipes) and no more: importing
``multiprocessing.connection`` (tempfile, shutil, subprocess and the rest) took
~9 ms of every backup's start here, and a resumed backup pays its start again.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Callable

_LENGTH = struct.Struct("!I")


class Channel:
    """One end of a duplex channel of pickled messages (a Unix socket pair)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: object) -> None:
        """Sends ``message`` whole (blocks while the other end's buffer is full)."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self) -> object:
        """The next message; EOFError once the other end is closed."""
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return pickle.loads(self._read(length))

    def _read(self, size: int) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the other end of the channel is closed")
            got += n
        return data

    def close(self) -> None:
        self._sock.close()


def channel_pair() -> tuple[Channel, Channel]:
    """Two connected ends: one for this process, one for a child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(ours), Channel(theirs)


def readable(channels: list[Channel], timeout: float) -> list[Channel]:
    """The channels with a message (or an end of file) waiting, after up to ``timeout`` s."""
    poller = select.poll()
    by_fd = {}
    for channel in channels:
        by_fd[channel.fileno()] = channel
        poller.register(channel.fileno(), select.POLLIN)
    return [by_fd[fd] for fd, _events in poller.poll(timeout * 1000)]


class Child:
    """A forked process running ``target(*args)``, which must end with ``os._exit``."""

    def __init__(self, target: Callable[..., None], args: tuple):
        pid = os.fork()
        if pid == 0:  # the child
            try:
                target(*args)
            finally:
                os._exit(1)  # only reached if target returned or raised without exiting
        self.pid = pid
        self.exitcode: int | None = None  # as multiprocessing: -N if killed by signal N

    def _reap(self, block: bool) -> bool:
        if self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self.exitcode = -1
                return True
            if pid == 0:
                return False
            self.exitcode = os.waitstatus_to_exitcode(status)
        return True

    def join(self, timeout: float | None = None) -> None:
        """Waits up to ``timeout`` seconds (None: for ever) for the child to end."""
        if timeout is None:
            self._reap(block=True)
            return
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not self._reap(block=False) and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.01)

    def is_alive(self) -> bool:
        return not self._reap(block=False)

    def kill(self) -> None:
        if self.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
