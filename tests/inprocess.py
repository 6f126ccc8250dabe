"""A real server running inside the test process, for unit tests of client stages.

The storage, the servicer and gRPC are the real ones (on loopback); only the
process boundary is gone, so a test can reach into the server's state (end a
session behind the client's back) and drive one client stage at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pysrbup.client.connection import Connection
from pysrbup.client.repository import RemoteRepository
from pysrbup.crypto.keys import MasterKey
from pysrbup.server.serve import serve
from pysrbup.server.storage import Repository
from pysrbup.server.tls import load_or_create


@dataclass
class InProcess:
    """The server's repository and a client's initialised view of it."""

    storage: Repository
    remote: RemoteRepository
    key: MasterKey


@contextlib.contextmanager
def in_process_server(path: str, key: MasterKey | None = None) -> Iterator[InProcess]:
    """Serves a repository at ``path`` on loopback; yields it initialised for ``key``."""
    key = key or MasterKey.generate()
    storage = Repository.open(path)
    server, port = serve(storage, "127.0.0.1:0", 2)
    conn = Connection(f"127.0.0.1:{port}", tls_fingerprint=load_or_create(storage.root).fingerprint)
    try:
        remote = RemoteRepository(conn, key)
        if not remote.initialised:
            remote.initialise(storage.init_token())
        yield InProcess(storage, remote, key)
    finally:
        conn.close()
        server.stop(grace=None)
        storage.close()
