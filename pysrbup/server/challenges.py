"""Single-use challenges and the proofs that spend them (BeginSession, deletes, condemns)."""

from __future__ import annotations

import os
import threading
import time

from pysrbup.errors import PermissionDeniedError
from pysrbup.repo import auth

#: Outstanding challenges; the oldest is forgotten beyond this (anyone may ask for one).
MAX_CHALLENGES = 4096
CHALLENGE_SECONDS = 300


class Challenges:
    """Hands out challenges and accepts each once, before it expires."""

    def __init__(self) -> None:
        self._challenges: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def new(self) -> bytes:
        """A single-use challenge for BeginSession or a destructive request."""
        challenge = os.urandom(32)
        now = time.monotonic()
        with self._lock:
            if len(self._challenges) >= MAX_CHALLENGES:
                self._challenges = {c: t for c, t in self._challenges.items() if t > now}
            while len(self._challenges) >= MAX_CHALLENGES:  # insertion order: oldest first
                del self._challenges[next(iter(self._challenges))]
            self._challenges[challenge] = now + CHALLENGE_SECONDS
        return challenge

    def take(self, challenge: bytes) -> None:
        """Spends a challenge; PermissionDeniedError if it is unknown, used or expired."""
        with self._lock:
            expiry = self._challenges.pop(challenge, None)
        if expiry is None or expiry < time.monotonic():
            raise PermissionDeniedError("unknown, used or expired challenge")

    def check_destroy(
        self, append_only: bool, public_key: bytes, challenge: bytes, signature: bytes, message
    ) -> None:
        """Accepts a destroy-key proof over ``message`` for a fresh challenge."""
        if append_only:
            raise PermissionDeniedError("the server is append-only: deleting is refused")
        self.take(challenge)
        auth.verify(public_key, signature, message, "destroy")
