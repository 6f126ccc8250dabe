"""Retrying what a server restart or a cut connection interrupts, within a deadline.

Two helpers for every client retry loop (restic's ``backend/retry`` idea):
``retrying`` retries transient failures (the server or the connection went
away) with exponential backoff until no progress was made for ``seconds``;
``until_settled`` reruns a step that a concurrent change made the server
refuse (``ConflictError``), a bounded number of times. Anything else goes
straight to the caller.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

from pysrbup import envvars
from pysrbup.errors import ConflictError, NotFoundError, ServerUnavailableError

T = TypeVar("T")

#: How long a client keeps retrying without progress (PYSRBUP_RETRY_SECONDS).
RETRY_SECONDS = envvars.seconds("PYSRBUP_RETRY_SECONDS", 30.0, allow_zero=True)
TRANSIENT = (ServerUnavailableError, NotFoundError)


class Backoff:
    """Exponential delays from 0.2 s to 5 s, and a deadline that progress resets."""

    def __init__(self, seconds: float = RETRY_SECONDS):
        self.seconds = seconds
        self.delay = 0.2
        self.last_progress = time.monotonic()

    def progressed(self) -> None:
        self.delay = 0.2
        self.last_progress = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.last_progress > self.seconds

    def wait(self) -> float:
        """Sleeps the current delay and returns it; the next one is longer."""
        delay = self.delay
        time.sleep(delay)
        self.delay = min(delay * 2, 5.0)
        return delay


def retrying(
    attempt: Callable[[], T],
    warn: Callable[[str], None],
    what: str,
    on_transient: Callable[[Exception], None] | None = None,
    seconds: float = RETRY_SECONDS,
) -> T:
    """Runs ``attempt`` until it succeeds, retrying transient failures until ``seconds`` pass.

    ``on_transient`` runs before each retry (e.g. to renew a forgotten session).
    """
    backoff = Backoff(seconds)
    while True:
        try:
            return attempt()
        except TRANSIENT as exc:
            if backoff.expired():
                raise
            warn(f"{exc}; retrying {what} in {backoff.delay:.1f} s")
            backoff.wait()
            if on_transient is not None:
                with contextlib.suppress(ServerUnavailableError):  # tried on the next round
                    on_transient(exc)


def until_settled(attempt: Callable[[], T], give_up: str, attempts: int = 10) -> T:
    """Runs ``attempt`` again while the server refuses it for a concurrent change.

    ``ConflictError`` after ``attempts`` tries becomes ``ConflictError(give_up)``.
    """
    for _ in range(attempts):
        try:
            return attempt()
        except ConflictError:
            continue
    raise ConflictError(give_up)
