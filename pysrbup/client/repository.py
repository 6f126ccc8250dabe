"""The client's view of a remote repository, opened with (or without) the key."""

from __future__ import annotations

import os
from collections.abc import Iterator

from pysrbup.client.connection import Connection
from pysrbup.client.idcache import IdCache
from pysrbup.crypto.keys import MasterKey
from pysrbup.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    UsageError,
    WrongKeyError,
)
from pysrbup.proto import repo_pb2, service_pb2
from pysrbup.repo import envelope, snapshot
from pysrbup.repo.auth import condemn_message, delete_message

KEY_ID_SIZE = envelope.KEY_ID_SIZE
#: Ids per fetch request (the server accepts up to 65,536).
FETCH_IDS = 1024
COMMIT_ATTEMPTS = 10


class RemoteRepository:
    """A connection plus the key: checks the key fits, opens objects and snapshots."""

    def __init__(self, conn: Connection, key: MasterKey | None):
        self.conn = conn
        self.key = key
        self.info = conn.info()
        self._opener: envelope.Opener | None = None
        if key is not None:
            registered = self.info.auth_public_key
            if registered and registered != key.auth_public_key:
                raise WrongKeyError("the key does not belong to this repository")

    @property
    def repo_id(self) -> bytes:
        return self.info.repo_id

    def _require_key(self) -> MasterKey:
        if self.key is None:
            raise UsageError("this command needs the key file")
        return self.key

    def ensure_registered(self) -> None:
        """Registers our auth key with a fresh repository (first writer wins)."""
        key = self._require_key()
        if not self.info.auth_public_key:
            registered = self.conn.register_key(key.auth_public_key)
            if registered != key.auth_public_key:
                raise WrongKeyError("the key does not belong to this repository")
            self.info = self.conn.info()

    def new_session_sealer(self) -> envelope.Sealer:
        """A fresh session key, stored wrapped on the server, and a sealer for it."""
        key = self._require_key()
        key_id = os.urandom(KEY_ID_SIZE)
        session_key = os.urandom(32)
        self.conn.put_session_key(
            key_id, envelope.wrap_session_key(key.wrap_key, key_id, session_key)
        )
        sealer = envelope.Sealer(key.mac_key, session_key, key_id)
        if self._opener is not None:
            self._opener.add_session_key(key_id, session_key)
        return sealer

    @property
    def opener(self) -> envelope.Opener:
        if self._opener is None:
            key = self._require_key()
            self._opener = envelope.Opener(key.mac_key, key.wrap_key, self.conn.session_keys())
        return self._opener

    def fetch_objects(self, oids: list[bytes]) -> Iterator[tuple[bytes, bytes | None, str]]:
        """Yields (id, verified plaintext or None, why not) for ``oids``, in batches."""
        for start in range(0, len(oids), FETCH_IDS):
            for oid, status, payload in self.conn.fetch_frames(oids[start : start + FETCH_IDS]):
                if status != 0:
                    what = "missing" if status == 1 else "damaged"
                    yield oid, None, f"object {oid.hex()[:16]} is {what} in the repository"
                    continue
                try:
                    yield oid, self.opener.open(oid, payload), ""
                except IntegrityError as exc:
                    yield oid, None, str(exc)

    def snapshots(self) -> list[service_pb2.SnapshotInfo]:
        return self.conn.snapshots()

    def find_snapshot(self, backup_id: str) -> service_pb2.SnapshotInfo:
        """The snapshot whose id is ``backup_id`` or starts with it (unique prefix)."""
        backup_id = backup_id.strip().lower()
        if not backup_id:
            raise NotFoundError("empty backup id")
        infos = self.snapshots()
        exact = [i for i in infos if i.snapshot_id == backup_id]
        if exact:
            return exact[0]
        matches = [i for i in infos if i.snapshot_id.startswith(backup_id)]
        if not matches:
            raise NotFoundError(f"no backup with id {backup_id} in this repository")
        if len(matches) > 1:
            raise NotFoundError(f"backup id {backup_id} is ambiguous; give more characters")
        return matches[0]

    def open_snapshot(self, info: service_pb2.SnapshotInfo) -> repo_pb2.Snapshot:
        return snapshot.open_snapshot(self.opener, info.snapshot_id, info.record)

    def delete_snapshot(self, snapshot_id: str) -> bool:
        """Deletes a snapshot record, proving knowledge of the key; True if already gone."""
        key = self._require_key()
        challenge = self.conn.challenge()
        signature = key.auth_key.sign(delete_message(self.repo_id, challenge, snapshot_id))
        return self.conn.delete_snapshot(snapshot_id, challenge, signature)

    def condemn(self, oids: list[bytes], generation: int) -> service_pb2.CondemnReply:
        """Asks the server to condemn ``oids`` as garbage, proving knowledge of the key."""
        key = self._require_key()
        blob = b"".join(sorted(oids))
        challenge = self.conn.challenge()
        signature = key.auth_key.sign(condemn_message(self.repo_id, challenge, generation, blob))
        return self.conn.condemn(blob, generation, challenge, signature)

    def commit_backup(
        self, cache: IdCache, session_id: str, backup_id: str, record: bytes, used: set[bytes]
    ) -> None:
        """Commits a snapshot after reviving anything it uses that a delete condemned.

        The server refuses the commit if anything was condemned after the
        id-log position we checked, so the check and the commit cannot race.
        """
        for _ in range(COMMIT_ATTEMPTS):
            condemned = cache.sync(self.conn, self.info.id_log_epoch)
            relied = [oid for oid in condemned if oid in used]
            if relied and self.conn.revive(session_id, relied):
                raise ConflictError(
                    "a concurrent delete removed data this backup relies on; run the backup again"
                )
            try:
                self.conn.commit_snapshot(session_id, backup_id, record, cache.last_seq)
                return
            except ConflictError:
                continue
        raise ConflictError("the repository kept changing during the commit; run the backup again")
