"""Starting and stopping the gRPC server."""

from __future__ import annotations

from concurrent import futures

import grpc

from pysrbup.proto import service_pb2_grpc
from pysrbup.server.servicer import BackupServicer
from pysrbup.server.storage import Repository

#: Frames carry up to a few MiB of objects; trees of huge directories can be larger.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024

#: Methods that carry bulk data as raw bytes frames (see BackupServicer.UploadRaw).
RAW_SERVICE = "pysrbup.proto.BackupRaw"

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _tune_malloc() -> None:
    """Keeps freed multi-MiB buffers in the heap (see pysrbup/client/memtune.py)."""
    from pysrbup.client.memtune import tune_malloc

    tune_malloc()


def serve(repo: Repository, bind_to: str, num_threads: int) -> tuple[grpc.Server, int]:
    """Starts a threaded server for ``repo`` on ``bind_to``; returns it and its port."""
    _tune_malloc()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(2, num_threads * 2)),
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=None,
    )
    servicer = BackupServicer(repo)
    service_pb2_grpc.add_BackupServicer_to_server(servicer, server)
    # Bulk data as raw bytes: no (de)serializers, so no protobuf copy per frame.
    raw = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Upload": grpc.stream_stream_rpc_method_handler(servicer.UploadRaw),
            "Fetch": grpc.unary_stream_rpc_method_handler(servicer.FetchRaw),
        },
    )
    server.add_generic_rpc_handlers((raw,))
    port = server.add_insecure_port(bind_to)
    if port == 0:
        raise OSError(f"cannot listen on {bind_to}")
    server.start()
    return server, port
