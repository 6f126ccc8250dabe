"""What a key holder signs to prove a capability to the server.

Two capabilities are derived from the master key (see crypto/keys.py), each
an Ed25519 key whose public half the owner fixed when initialising the
repository: *write* (begin a session) and *destroy* (delete, condemn). A
session is bound to an ephemeral Ed25519 key named in its signed
BeginSession; every later request of the session is signed by that key.

Every message starts with a distinct label and names the repository, and
each carries a single-use server challenge or a per-session sequence
number, so a captured signature can be replayed neither against another
repository, nor for another operation, nor a second time. ``repo_id`` is
always part of what is signed.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pysrbup.errors import PermissionDeniedError

#: Operations a session proof may be for (the body digest is over the request's contents).
OP_UPLOAD = "upload"
OP_PUT_KEY = "put-key"
OP_REVIVE = "revive"
OP_COMMIT = "commit"
OP_END = "end"


def _digest(*parts: bytes) -> bytes:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)
    return hasher.digest()


def init_message(repo_id: bytes, token: bytes, write_public: bytes, destroy_public: bytes) -> bytes:
    """The bytes each capability key signs to initialise a repository."""
    return b"pysrbup-init\0" + repo_id + _digest(token, write_public, destroy_public)


def begin_message(repo_id: bytes, challenge: bytes, session_public: bytes) -> bytes:
    """The bytes the write key signs to open a session bound to ``session_public``."""
    return b"pysrbup-begin\0" + repo_id + challenge + session_public


def session_message(repo_id: bytes, session_id: str, seq: int, op: str, body: bytes) -> bytes:
    """The bytes a session key signs for one request of its session."""
    return (
        b"pysrbup-session\0"
        + repo_id
        + _digest(session_id.encode(), seq.to_bytes(8, "little"), op.encode(), body)
    )


def commit_body(snapshot_id: str, record: bytes, checked_seq: int) -> bytes:
    """What a commit's session proof covers."""
    return _digest(snapshot_id.encode(), record, checked_seq.to_bytes(8, "little"))


def put_key_body(key_id: bytes, wrapped: bytes) -> bytes:
    """What a PutSessionKey's session proof covers."""
    return _digest(key_id, wrapped)


def ids_body(ids: bytes) -> bytes:
    """What a proof over a list of ids (revive) covers."""
    return hashlib.sha256(ids).digest()


def delete_message(repo_id: bytes, challenge: bytes, snapshot_id: str) -> bytes:
    """The bytes the destroy key signs to delete ``snapshot_id``."""
    return b"pysrbup-delete\0" + repo_id + challenge + snapshot_id.encode()


def snapshot_set_digest(snapshot_ids: list[str]) -> bytes:
    """Names a set of snapshots: what a condemning client saw when it computed the live set."""
    return _digest(*(s.encode() for s in sorted(set(snapshot_ids))))


def condemn_message(repo_id: bytes, challenge: bytes, snapshot_set: bytes, ids: bytes) -> bytes:
    """The bytes the destroy key signs to condemn ``ids`` (concatenated) as garbage.

    ``snapshot_set`` (``snapshot_set_digest``) names the snapshots whose
    trees the live set was computed from; the server refuses the condemn when
    its own set differs, so a listing that hid a backup cannot get that
    backup's data condemned.
    """
    return b"pysrbup-condemn\0" + repo_id + challenge + snapshot_set + ids_body(ids)


def verify(public_key: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Checks an Ed25519 signature; PermissionDeniedError naming ``what`` otherwise."""
    if not public_key:
        raise PermissionDeniedError("the repository is not initialised (pysrbup-client init)")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise PermissionDeniedError(f"the proof of the {what} key does not verify") from None
