"""A lying or stalling server: the client gives a clear error in bounded time and memory.

The servers here are fakes on purpose: real gRPC servers on loopback (plaintext) that
implement the protocol the way a hostile server would.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
from helpers import assert_no_traceback, free_port

from pysrbup.proto import service_pb2, service_pb2_grpc


class _Hostile(service_pb2_grpc.BackupServicer):
    """Answers GetInfo, then misbehaves in the way ``mode`` says."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sent = 0
        self.hang = threading.Event()  # set only at teardown: handlers wait on it "forever"

    def GetInfo(self, request, context):
        if self.mode == "stall-info":
            self.hang.wait(60)
        return service_pb2.InfoReply(
            repo_id=b"r" * 16,
            format_version=2 if self.mode == "newer-format" else 1,
            id_log_epoch=1,
            id_log_last_seq=1000,
        )

    def ListSnapshots(self, request, context):
        if self.mode == "escape-ids":
            yield service_pb2.SnapshotInfo(snapshot_id="\x1b[2J\x1b[31mowned", record=b"x")
            return
        yield service_pb2.SnapshotInfo(snapshot_id="0123456789abcdef", record=b"x")
        self.hang.wait(60)  # stall-list: one record, then nothing

    def SyncIds(self, request, context):
        seq = request.after_seq
        while self.sent < 10_000_000:  # endless, as far as the client can tell
            batch = os.urandom(32 * 100)
            seq += 100
            self.sent += 100
            yield service_pb2.IdBatch(ids=batch, ops=bytes(100), last_seq=seq)


@pytest.fixture
def hostile(request):
    """A fake server on loopback running ``_Hostile(mode)``; yields (address, servicer)."""
    servicer = _Hostile(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_BackupServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    servicer.hang.set()
    server.stop(grace=0)


def _env(client_env: dict) -> dict:
    return {**client_env, "PYSRBUP_PLAINTEXT": "1", "PYSRBUP_TIMEOUT": "2"}


@pytest.fixture
def env(tmp_path):
    from helpers import base_env

    cache = tmp_path / "cache"
    cache.mkdir()
    return _env(base_env(str(cache)))


def _run_list(address: str, env: dict):
    from helpers import Client

    started = time.monotonic()
    proc = Client(address, env).run("list", timeout=60)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("hostile", ["newer-format"], indirect=True)
def test_a_repository_of_a_newer_format_is_refused(hostile, env):
    proc, _ = _run_list(hostile[0], env)
    assert proc.returncode == 1
    assert "keeps repository format 2, this pysrbup reads format 1 only" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "0123456789abcdef" not in proc.stdout  # nothing was listed
    assert_no_traceback(proc)


@pytest.mark.parametrize("hostile", ["stall-info"], indirect=True)
def test_a_server_that_never_replies_times_out(hostile, env):
    proc, took = _run_list(hostile[0], env)
    assert proc.returncode == 1
    assert "did not answer within 2 s" in proc.stderr and "PYSRBUP_TIMEOUT" in proc.stderr
    assert took < 20
    assert_no_traceback(proc)


@pytest.mark.parametrize("hostile", ["stall-list"], indirect=True)
def test_a_stream_that_stalls_is_cancelled(hostile, env):
    proc, took = _run_list(hostile[0], env)
    assert proc.returncode == 1
    assert "stopped answering" in proc.stderr, proc.stderr
    assert took < 20
    assert_no_traceback(proc)


@pytest.mark.parametrize("hostile", ["escape-ids"], indirect=True)
def test_terminal_escapes_in_server_ids_are_refused(hostile, env):
    proc, _ = _run_list(hostile[0], env)
    assert proc.returncode == 1
    assert "malformed" in proc.stderr
    assert "\x1b" not in proc.stderr and "\x1b" not in proc.stdout
    assert_no_traceback(proc)


@pytest.mark.parametrize("hostile", ["endless-ids"], indirect=True)
def test_an_endless_id_log_is_read_only_as_far_as_announced(hostile, tmp_path, monkeypatch):
    from pysrbup.client.connection import Connection
    from pysrbup.client.idcache import IdCache

    monkeypatch.setenv("PYSRBUP_CACHE_DIR", str(tmp_path / "cache"))
    address, servicer = hostile
    with Connection(address, plaintext=True) as conn:
        cache = IdCache(b"r" * 16)
        started = time.monotonic()
        cache.sync(conn)
    assert time.monotonic() - started < 20
    assert len(cache.ids) == 1000 and cache.last_seq == 1000  # what GetInfo announced
    assert servicer.sent < 1_000_000  # the client stopped reading; the stream was cancelled


def test_a_silent_tcp_peer_gives_a_clear_error(env):
    """Something that accepts connections and never speaks (TLS or not)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        for extra in ({}, {"PYSRBUP_PLAINTEXT": ""}):
            proc, took = _run_list(address, {**env, **extra, "PYSRBUP_CONNECT_TIMEOUT": "3"})
            assert proc.returncode == 1, proc.stderr
            assert took < 30
            assert_no_traceback(proc)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
