"""A writing session on the server, and the proofs that bind requests to it.

A session is opened with the write key's signature over a fresh challenge
and names an ephemeral Ed25519 key made for it; every later request of the
session (upload streams, session key, revive, commit, end) is signed by that
key with its own sequence number. The ephemeral key never leaves this
process, so a session id seen on the wire is worth nothing to anyone else.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pysrbup.crypto.keys import public_bytes
from pysrbup.proto import service_pb2
from pysrbup.repo import auth, wire


class WriteSession:
    """One open session: its id and the key that signs its requests."""

    def __init__(self, repo_id: bytes, session_id: str, private: Ed25519PrivateKey):
        self.repo_id = repo_id
        self.session_id = session_id
        self._private = private
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    @staticmethod
    def new_key() -> tuple[Ed25519PrivateKey, bytes]:
        """A fresh ephemeral session key and its public half."""
        private = Ed25519PrivateKey.generate()
        return private, public_bytes(private)

    def proof(self, op: str, body: bytes = b"") -> service_pb2.SessionProof:
        """A single-use proof for one request of this session."""
        with self._lock:
            seq = next(self._seq)
        message = auth.session_message(self.repo_id, self.session_id, seq, op, body)
        return service_pb2.SessionProof(
            session_id=self.session_id, seq=seq, signature=self._private.sign(message)
        )

    def upload_metadata(self) -> tuple:
        """gRPC metadata that opens an upload stream on this session."""
        proof = self.proof(auth.OP_UPLOAD)
        return (
            (wire.SESSION_KEY, proof.session_id),
            (wire.SESSION_SEQ_KEY, str(proof.seq)),
            (wire.SESSION_PROOF_KEY, proof.signature),
        )


class SessionHolder:
    """The backup's current session, renewed when the server forgot it (a restart).

    The uploader and the commit share one holder, so a renewal made by one is
    seen by the other and a session is renewed once, not once per caller.
    """

    def __init__(self, begin: Callable[[], WriteSession]):
        self._begin = begin
        self._lock = threading.Lock()
        self.current = begin()
        self.renewals = 0

    def renew(self, stale: WriteSession) -> WriteSession:
        """A new session in place of ``stale`` (or the one another caller already made)."""
        with self._lock:
            if self.current is stale:
                self.current = self._begin()
                self.renewals += 1
            return self.current
