"""The client's view of a remote repository, opened with (or without) the key."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pysrbup.client.cache import repo_cache_dir
from pysrbup.client.connection import Connection
from pysrbup.client.retry import until_settled
from pysrbup.client.session import WriteSession
from pysrbup.crypto.keys import Key, MasterKey
from pysrbup.errors import (
    ConcurrentDeleteError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    PutOnlyKeyError,
    RepositoryError,
    UsageError,
    WrongKeyError,
)
from pysrbup.proto import repo_pb2, service_pb2
from pysrbup.repo import auth, envelope, snapshot, wire

if TYPE_CHECKING:  # the id cache pulls in numpy, which a restore does not need
    from pysrbup.client.idcache import IdCache

#: Ids per fetch request (the server accepts up to wire.MAX_IDS_PER_REQUEST).
FETCH_IDS = 1024
ENV_INIT_TOKEN = "PYSRBUP_INIT_TOKEN"


def not_initialised_error() -> RepositoryError:
    return RepositoryError(
        "the repository is not initialised: run pysrbup-client init --init-token TOKEN KEY_FILE "
        "(the token is in <backups_dir>/init-token on the server)"
    )


class SeenSnapshots:
    """The snapshot set this machine last saw in a repository (``snapshots.seen``).

    A backup that disappears from a listing without a delete of our own is
    reported: a server (or a man in the middle) that hides or rolls back
    backups does not go unnoticed.
    """

    def __init__(self, repo_id: bytes):
        self.path = os.path.join(repo_cache_dir(repo_id), "snapshots.seen")

    def load(self) -> set[str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return {s for s in json.load(handle) if isinstance(s, str)}
        except (OSError, ValueError, TypeError):
            return set()

    def save(self, ids: set[str]) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(sorted(ids), handle)
        os.replace(tmp, self.path)

    def update(self, current: set[str]) -> set[str]:
        """Records ``current``; returns the ids seen before that are gone now."""
        vanished = self.load() - current
        self.save(current)
        return vanished

    def forget(self, snapshot_id: str) -> None:
        """Our own delete: the id's absence from later listings is expected."""
        seen = self.load()
        if snapshot_id in seen:
            seen.discard(snapshot_id)
            self.save(seen)


class RemoteRepository:
    """A connection plus the key: checks the key fits, opens objects and snapshots."""

    def __init__(
        self,
        conn: Connection,
        key: Key | None,
        warn: Callable[[str], None] | None = None,
    ):
        self.conn = conn
        self.key = key
        self.warn = warn or (lambda message: None)
        self.info = conn.info()
        self._opener: envelope.Opener | None = None
        if key is not None and self.initialised:
            self._check_key(key)

    @property
    def repo_id(self) -> bytes:
        return self.info.repo_id

    @property
    def initialised(self) -> bool:
        return bool(self.info.write_public_key and self.info.destroy_public_key)

    def _check_key(self, key: Key) -> None:
        if (self.info.write_public_key, self.info.destroy_public_key) != (
            key.write_public_key,
            key.destroy_public_key,
        ):
            raise WrongKeyError("the key does not belong to this repository")

    def _require_key(self) -> Key:
        if self.key is None:
            raise UsageError("this command needs the key file")
        return self.key

    def _require_master(self) -> MasterKey:
        key = self._require_key()
        if not isinstance(key, MasterKey):
            raise PutOnlyKeyError(
                "this is a put-only key: it can back up, but not read, restore or delete backups"
            )
        return key

    # ---- initialising and sessions ---------------------------------------------

    def initialise(self, token: str) -> None:
        """Fixes the repository's public keys to ours, with the server's init token."""
        key = self._require_master()
        if self.initialised:
            self._check_key(key)
            raise PermissionDeniedError("the repository is already initialised with this key")
        token_b = token.strip().encode()
        message = auth.init_message(
            self.repo_id, token_b, key.write_public_key, key.destroy_public_key
        )
        self.conn.init_repository(
            service_pb2.InitRequest(
                token=token_b,
                write_public_key=key.write_public_key,
                destroy_public_key=key.destroy_public_key,
                write_signature=key.write_key.sign(message),
                destroy_signature=key.destroy_key.sign(message),
            )
        )
        self.info = self.conn.info()
        self._check_key(key)

    def ensure_initialised(self) -> None:
        """Initialises a new repository when ``PYSRBUP_INIT_TOKEN`` is set; else says how."""
        if self.initialised:
            return
        token = os.environ.get(ENV_INIT_TOKEN, "")
        if not token:
            raise not_initialised_error()
        try:
            self.initialise(token)
        except PermissionDeniedError:
            self.info = self.conn.info()  # another client with this key may have been first
            if not self.initialised:
                raise
            self._check_key(self._require_key())

    def begin_session(self) -> WriteSession:
        """Opens a writing session, proving the write capability."""
        key = self._require_key()
        if not self.initialised:
            raise not_initialised_error()
        private, public = WriteSession.new_key()
        challenge = self.conn.challenge()
        signature = key.write_key.sign(auth.begin_message(self.repo_id, challenge, public))
        session_id = self.conn.begin_session(challenge, public, signature)
        return WriteSession(self.repo_id, session_id, private)

    def end_session(self, session: WriteSession) -> None:
        self.conn.end_session(session.proof(auth.OP_END))

    def new_session_sealer(self, session: WriteSession) -> envelope.Sealer:
        """A fresh session key, stored wrapped on the server, and a sealer for it."""
        key = self._require_key()
        key_id = os.urandom(wire.KEY_ID_SIZE)
        session_key = os.urandom(32)
        if isinstance(key, MasterKey):
            wrapped = envelope.wrap_session_key(key.wrap_key, key_id, session_key)
        else:  # sealed to the master key: this client cannot open it again
            wrapped = envelope.seal_session_key(key.seal_public_key, key_id, session_key)
        self.conn.put_session_key(
            session.proof(auth.OP_PUT_KEY, auth.put_key_body(key_id, wrapped)), key_id, wrapped
        )
        sealer = envelope.Sealer(key.mac_key, session_key, key_id)
        if self._opener is not None:
            self._opener.add_session_key(key_id, session_key)
        return sealer

    # ---- reading -------------------------------------------------------------

    @property
    def opener(self) -> envelope.Opener:
        if self._opener is None:
            key = self._require_master()
            self._opener = envelope.Opener(
                key.mac_key,
                key.wrap_key,
                self.conn.session_keys(),
                key.seal_private,
                reload=self.conn.session_keys,  # a backup committed since: its key is new
            )
        return self._opener

    def fetch_objects(self, oids: list[bytes]) -> Iterator[tuple[bytes, bytes | None, str]]:
        """Yields (id, verified plaintext or None, why not) for ``oids``, in batches."""
        for start in range(0, len(oids), FETCH_IDS):
            for oid, status, payload in self.conn.fetch_frames(oids[start : start + FETCH_IDS]):
                if status != wire.FETCH_FOUND:
                    what = "missing" if status == wire.FETCH_MISSING else "damaged"
                    yield oid, None, f"object {oid.hex()[:16]} is {what} in the repository"
                    continue
                try:
                    yield oid, self.opener.open(oid, payload), ""
                except IntegrityError as exc:
                    yield oid, None, str(exc)

    def missing_objects(self, oids: list[bytes]) -> list[bytes]:
        """The ids among ``oids`` the repository does not store (batched existence queries)."""
        missing = []
        step = wire.MAX_IDS_PER_REQUEST
        for start in range(0, len(oids), step):
            part = oids[start : start + step]
            present = self.conn.has_objects(part)
            missing += [oid for oid, ok in zip(part, present, strict=True) if not ok]
        return missing

    def snapshots(self) -> list[service_pb2.SnapshotInfo]:
        """Every snapshot record the server lists, checked for well-formed, unique ids.

        Warns when a backup seen before from this machine is missing without
        a delete of our own (hidden or rolled back by the server).
        """
        infos = self.conn.snapshots()  # ids checked there: 16 hex digits, unique
        ids = {info.snapshot_id for info in infos}
        vanished = SeenSnapshots(self.repo_id).update(ids)
        if vanished:
            shown = ", ".join(sorted(vanished)[:10])
            self.warn(
                f"{len(vanished)} backup(s) listed before are gone without a delete from this "
                f"machine: {shown} (deleted elsewhere, or hidden by the server)"
            )
        return infos

    def find_snapshot(
        self, backup_id: str, infos: list[service_pb2.SnapshotInfo] | None = None
    ) -> service_pb2.SnapshotInfo:
        """The snapshot whose id is ``backup_id`` or starts with it (unique prefix).

        ``infos`` is a listing already made (one per command, not one per id).
        """
        backup_id = backup_id.strip().lower()
        if not backup_id or not re.fullmatch(r"[0-9a-f]{1,16}", backup_id):
            raise NotFoundError(f"{backup_id!r} is not a backup id (16 hex digits or a prefix)")
        if infos is None:
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

    # ---- destroying ------------------------------------------------------------

    def delete_snapshot(self, snapshot_id: str) -> bool:
        """Deletes a snapshot record, proving the destroy capability; True if already gone."""
        key = self._require_master()
        challenge = self.conn.challenge()
        signature = key.destroy_key.sign(auth.delete_message(self.repo_id, challenge, snapshot_id))
        already = self.conn.delete_snapshot(snapshot_id, challenge, signature)
        SeenSnapshots(self.repo_id).forget(snapshot_id)
        return already

    def condemn(self, oids: list[bytes], snapshot_ids: list[str]) -> service_pb2.CondemnReply:
        """Asks the server to condemn ``oids`` as garbage, proving the destroy capability.

        ``snapshot_ids`` are the snapshots the live set was computed from; the
        server refuses if its own set differs.
        """
        key = self._require_master()
        blob = b"".join(sorted(oids))
        snapshot_set = auth.snapshot_set_digest(snapshot_ids)
        challenge = self.conn.challenge()
        signature = key.destroy_key.sign(
            auth.condemn_message(self.repo_id, challenge, snapshot_set, blob)
        )
        return self.conn.condemn(blob, snapshot_set, challenge, signature)

    # ---- committing ------------------------------------------------------------

    def _revive(self, session: WriteSession, oids: list[bytes]) -> list[bytes]:
        """Revives ``oids`` in batches; returns those the repository no longer has."""
        gone = []
        step = wire.MAX_IDS_PER_REQUEST
        for start in range(0, len(oids), step):
            blob = b"".join(oids[start : start + step])
            gone += self.conn.revive(session.proof(auth.OP_REVIVE, auth.ids_body(blob)), blob)
        return gone

    def commit_backup(
        self,
        cache: IdCache,
        session: WriteSession,
        backup_id: str,
        record: bytes,
        used: set[bytes],
        revive: bool = True,
    ) -> None:
        """Commits a snapshot after reviving anything it uses that a delete condemned.

        ``cache`` was synced after ``session`` began and before anything in
        ``used`` was relied on: what is condemned after that sync is revived
        here (or, with ``revive`` False, fails the commit). The server
        refuses the commit if anything was condemned after the id-log
        position we checked, so the check and the commit cannot race.
        """

        def attempt() -> None:
            condemned = cache.sync(self.conn, make_set=False)  # the condemnations only
            relied = [oid for oid in dict.fromkeys(condemned) if oid in used]
            if relied and not revive:
                raise ConcurrentDeleteError("a concurrent delete removed the data; run it again")
            if self._revive(session, relied):
                raise ConcurrentDeleteError(
                    "a concurrent delete removed data this backup relies on; run the backup again"
                )
            checked = cache.last_seq
            proof = session.proof(auth.OP_COMMIT, auth.commit_body(backup_id, record, checked))
            self.conn.commit_snapshot(proof, backup_id, record, checked)

        until_settled(
            attempt, "the repository kept changing during the commit; run the backup again"
        )
