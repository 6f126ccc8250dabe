"""Starting and stopping the gRPC server."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc

from pysrbup.memtune import tune_malloc
from pysrbup.proto import service_pb2_grpc
from pysrbup.repo import wire
from pysrbup.server.servicer import BackupServicer
from pysrbup.server.storage import Repository
from pysrbup.server.tls import ServerCertificate

#: Free heap memory each malloc arena keeps: more than the server's threads free and
#: allocate again in a burst (pack reads and reply frames of several fetch streams,
#: upload frames), so a freed buffer at the top of the heap is not given back and
#: faulted in afresh, page by page, for the next one.
TRIM_THRESHOLD = 32 * 1024 * 1024

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    # Clients ping idle connections (keepalive) so a dead server is noticed: allow it.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Detect dead clients too, so their streams do not hold workers.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


def serve(
    repo: Repository,
    bind_to: str,
    num_threads: int,
    *,
    certificate: ServerCertificate | None = None,
    plaintext: bool = False,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """Starts a threaded server for ``repo`` on ``bind_to``; returns it and its port.

    TLS with ``certificate``, by default the repository's own (``tls.load_or_create``);
    ``plaintext`` serves without TLS. ``interceptors`` see every RPC, the raw-bytes
    methods too (``metrics.LatencyInterceptor``).
    """
    if not plaintext and certificate is None:
        from pysrbup.server.tls import load_or_create

        certificate = load_or_create(repo.root)
    # Keeps freed multi-MiB buffers in the heap (see pysrbup/memtune.py), with room for
    # a fetch frame and the pack spans it is copied from (TRIM_THRESHOLD).
    tune_malloc(trim_threshold=TRIM_THRESHOLD)
    server = grpc.server(
        # Streams hold a worker each for as long as they are open: enough workers
        # that a few slow or idle clients cannot starve everyone else.
        futures.ThreadPoolExecutor(max_workers=max(16, num_threads * 8)),
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
        interceptors=list(interceptors) or None,
        maximum_concurrent_rpcs=None,
    )
    servicer = BackupServicer(repo)
    service_pb2_grpc.add_BackupServicer_to_server(servicer, server)
    # Bulk data as raw bytes: no (de)serializers, so no protobuf copy per frame.
    raw = grpc.method_handlers_generic_handler(
        wire.RAW_SERVICE,
        {
            wire.UPLOAD_METHOD: grpc.stream_stream_rpc_method_handler(servicer.UploadRaw),
            wire.FETCH_METHOD: grpc.unary_stream_rpc_method_handler(servicer.FetchRaw),
        },
    )
    server.add_generic_rpc_handlers((raw,))
    if plaintext:
        port = server.add_insecure_port(bind_to)
    else:
        port = server.add_secure_port(bind_to, certificate.credentials())
    if port == 0:
        raise OSError(f"cannot listen on {bind_to}")
    server.start()
    return server, port
