"""Starting and stopping the gRPC server."""

from __future__ import annotations

from concurrent import futures

import grpc

from pysrbup.proto import service_pb2_grpc
from pysrbup.server.servicer import BackupServicer
from pysrbup.server.storage import Repository

#: Frames carry up to a few MiB of objects; trees of huge directories can be larger.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def serve(repo: Repository, bind_to: str, num_threads: int) -> tuple[grpc.Server, int]:
    """Starts a threaded server for ``repo`` on ``bind_to``; returns it and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(2, num_threads * 2)),
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=None,
    )
    service_pb2_grpc.add_BackupServicer_to_server(BackupServicer(repo), server)
    port = server.add_insecure_port(bind_to)
    if port == 0:
        raise OSError(f"cannot listen on {bind_to}")
    server.start()
    return server, port
