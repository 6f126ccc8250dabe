"""What a key holder signs to authorise a destructive request.

Each message names the repository and a single-use server challenge, so a
captured signature cannot be replayed against another repository or later.
"""

from __future__ import annotations

import hashlib


def delete_message(repo_id: bytes, challenge: bytes, snapshot_id: str) -> bytes:
    """The bytes signed to delete ``snapshot_id``."""
    return b"pysrbup-delete\0" + repo_id + challenge + snapshot_id.encode()


def condemn_message(repo_id: bytes, challenge: bytes, generation: int, ids: bytes) -> bytes:
    """The bytes signed to condemn ``ids`` (concatenated) as garbage."""
    digest = hashlib.sha256(ids).digest()
    return b"pysrbup-condemn\0" + repo_id + challenge + generation.to_bytes(8, "little") + digest
