"""What a key holder signs to authorise a destructive request.

Each message names the repository and a single-use server challenge, so a
captured signature cannot be replayed against another repository or later.
"""

from __future__ import annotations


def delete_message(repo_id: bytes, challenge: bytes, snapshot_id: str) -> bytes:
    """The bytes signed to delete ``snapshot_id``."""
    return b"pysrbup-delete\0" + repo_id + challenge + snapshot_id.encode()
