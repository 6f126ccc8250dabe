"""Per-stage throughput of the backup and restore pipelines.

Run: ``pytest bench/pipeline --benchmark-only`` (part of ``./build.sh bench``).
Inputs are deterministic: a third compressible text, a third random bytes,
a third zeros-and-text extents, like ``bench/compare.py``'s data set.

- chunk+hash: CDC cut points and keyed BLAKE3 ids over a reused buffer
- seal: the backup's compressibility check, zstd and AES-256-GCM per chunk
- open: AES-256-GCM, zstd and the id check per envelope (restore)
- frame: building upload frames (one copy per envelope)
- upload round trip: Uploader -> raw-bytes stream -> server pack + fsync +
  index -> acknowledgement, on loopback against an in-process server (client
  and server share one GIL here, so this is a regression signal, not the
  two-process figure)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compare import TextSource

from pysrbup._native import chunker, framing
from pysrbup.client import uploader as uploader_mod
from pysrbup.client.file_saver import compressible
from pysrbup.repo import envelope

MiB = 1024 * 1024
MAC_KEY = b"m" * 32
GEAR = chunker.gear_table(b"g" * 32)
SIZES = (chunker.DEFAULT_MIN, chunker.DEFAULT_AVG, chunker.DEFAULT_MAX)


def _data(size: int) -> bytes:
    rng = np.random.default_rng(5)
    text = TextSource(6)
    third = size // 3
    image = bytearray(third)
    at = 0
    while at < third:
        n = int(rng.integers(64 * 1024, 1024 * 1024))
        if rng.random() < 0.5:
            piece = text.make(n)
            image[at : at + n] = piece[: third - at]
        at += n
    return text.make(third) + rng.bytes(third) + bytes(image[:third])


DATA = _data(48 * MiB)


def _chunks() -> list[memoryview]:
    cuts = chunker.cut_points(GEAR, DATA, *SIZES, True)
    view = memoryview(DATA)
    out, start = [], 0
    for cut in cuts:
        out.append(view[start:cut])
        start = cut
    return out


CHUNKS = _chunks()
SEALER = envelope.Sealer(MAC_KEY, b"s" * 32, b"k" * 16)


def test_chunk_and_hash(throughput):
    buf = bytearray(len(DATA))

    def run():
        buf[:] = DATA  # the read into a reused buffer
        view = memoryview(buf)
        start = 0
        for cut in chunker.cut_points(GEAR, view, *SIZES, True):
            envelope.object_id(MAC_KEY, view[start:cut])
            start = cut

    throughput(run, len(DATA), group="pipeline stages")


def test_seal(throughput):
    oids = [envelope.object_id(MAC_KEY, c) for c in CHUNKS]

    def run():
        for oid, chunk in zip(oids, CHUNKS, strict=True):
            SEALER.seal(oid, chunk, compress=compressible(chunk))

    throughput(run, len(DATA), rounds=3, group="pipeline stages")


def test_open(throughput):
    opener = envelope.Opener(MAC_KEY, b"w" * 32, {})
    opener.add_session_key(b"k" * 16, b"s" * 32)
    sealed = []
    for chunk in CHUNKS:
        oid = envelope.object_id(MAC_KEY, chunk)
        sealed.append((oid, bytes(SEALER.seal(oid, chunk))))

    def run():
        for oid, env in sealed:
            opener.open(oid, env)

    throughput(run, len(DATA), group="pipeline stages")


def test_build_frames(throughput):
    records = [(b"i" * 32, 0, c) for c in CHUNKS]

    def run():
        for i in range(0, len(records), 4):
            framing.pack_records(records[i : i + 4])

    throughput(run, len(DATA), group="pipeline stages")


@pytest.fixture(scope="module")
def loopback_server(tmp_path_factory):
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository
    from pysrbup.crypto.keys import MasterKey
    from pysrbup.server.serve import serve
    from pysrbup.server.storage import Repository
    from pysrbup.server.tls import load_or_create

    repo = Repository(str(tmp_path_factory.mktemp("repo")))
    server, port = serve(repo, "127.0.0.1:0", 2)  # TLS, with the repository's own certificate
    # Pinned explicitly: nothing is recorded in the user's known_servers.
    conn = Connection(f"127.0.0.1:{port}", tls_fingerprint=load_or_create(repo.root).fingerprint)
    remote = RemoteRepository(conn, MasterKey.generate())
    remote.initialise(repo.init_token())
    yield remote
    conn.close()
    server.stop(grace=None)
    repo.close()


def test_upload_round_trip(throughput, loopback_server):
    from pysrbup.client.session import SessionHolder

    remote = loopback_server
    payload = np.random.default_rng(9).bytes(1 * MiB)
    count = 64

    def setup():
        ids = [os.urandom(32) for _ in range(count)]  # fresh ids: nothing is dropped
        return (ids,), {}

    def run(ids):
        up = uploader_mod.Uploader(remote.conn, SessionHolder(remote.begin_session))
        for oid in ids:
            up.put(oid, payload)
        stats = up.finish()
        assert stats.objects_stored == count

    throughput(run, count * len(payload), rounds=5, setup=setup, group="pipeline stages")
