"""Prometheus metrics of a serving repository (``pysrbup-server --metrics-address``).

Off by default. Nothing here runs per upload or fetch frame: the gauges and
counters are read at scrape time from what the repository keeps anyway
(``Repository.stats()``, its session table and ``Repository.counters``),
and the one figure measured per call, RPC latency, is one histogram
observation per RPC (an upload stream of thousands of frames is one call).
The metrics live in a registry of their own, so several servers in one
process (tests) do not collide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pysrbup import __version__
from pysrbup.errors import UsageError
from pysrbup.server.storage import Repository

#: Repository statistics are recomputed at most this often (they scan the index).
STATS_MAX_AGE = 2.0
#: RPC latency buckets, in seconds: from a HasObjects batch to an upload stream of minutes.
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf")),
)

# (``Repository.stats()`` key, metric name, help)
_STATS_GAUGES = (
    ("objects", "pysrbup_objects", "Objects the index holds, condemned ones included."),
    ("object_bytes", "pysrbup_object_bytes", "Bytes of the objects the index holds."),
    ("packs", "pysrbup_packs", "Pack files on disk."),
    ("pack_bytes", "pysrbup_pack_bytes", "Bytes of the pack files on disk."),
    ("parity_bytes", "pysrbup_parity_bytes", "Bytes of the parity sidecars on disk."),
    ("condemned_objects", "pysrbup_condemned_objects", "Objects condemned, not yet swept."),
    ("condemned_bytes", "pysrbup_condemned_bytes", "Bytes of the condemned objects."),
)
# (``Counters`` field, metric name without _total, help)
_COUNTERS = (
    ("upload_bytes", "pysrbup_upload_received_bytes", "Frame bytes received by uploads."),
    ("fetch_bytes", "pysrbup_fetch_sent_bytes", "Frame bytes sent by fetches."),
    ("objects_added", "pysrbup_objects_added", "Objects made durable by uploads."),
    ("object_bytes_added", "pysrbup_object_bytes_added", "Bytes of the objects added."),
    ("sessions_started", "pysrbup_sessions_started", "Writing sessions begun."),
    ("read_repairs", "pysrbup_read_repairs", "Packs checked against parity after a failed read."),
    (
        "read_repaired_blocks",
        "pysrbup_read_repaired_blocks",
        "Blocks rebuilt from parity after a failed read.",
    ),
    (
        "read_repaired_objects",
        "pysrbup_read_repaired_objects",
        "Objects served after their pack was repaired from parity.",
    ),
    (
        "read_damaged_objects",
        "pysrbup_read_damaged_objects",
        "Objects a fetch reported damaged (not repairable).",
    ),
    ("scrubs", "pysrbup_scrub_runs", "Scrubs completed."),
    ("scrub_blocks_checked", "pysrbup_scrub_checked_blocks", "Blocks verified by scrubs."),
    ("scrub_blocks_repaired", "pysrbup_scrub_repaired_blocks", "Blocks repaired by scrubs."),
    (
        "scrub_blocks_unrepairable",
        "pysrbup_scrub_unrepairable_blocks",
        "Damaged blocks scrubs could not repair (counted again by every scrub).",
    ),
    (
        "scrub_damaged_objects",
        "pysrbup_scrub_damaged_objects",
        "Objects scrubs found lost (counted again by every scrub).",
    ),
)
# (``Counters`` field, metric name, help)
_LAST_SCRUB_GAUGES = (
    (
        "last_scrub_time",
        "pysrbup_scrub_last_end_timestamp_seconds",
        "When the last scrub ended (Unix time; 0 before the first).",
    ),
    (
        "last_scrub_blocks_unrepairable",
        "pysrbup_scrub_last_unrepairable_blocks",
        "Damaged blocks the last scrub could not repair.",
    ),
    (
        "last_scrub_damaged_objects",
        "pysrbup_scrub_last_damaged_objects",
        "Objects the last scrub found lost.",
    ),
)


class RepositoryCollector:
    """Reads a repository's figures at scrape time (a ``prometheus_client`` collector)."""

    def __init__(self, repo: Repository, stats_max_age: float = STATS_MAX_AGE):
        self.repo = repo
        self.stats_max_age = stats_max_age
        self._lock = threading.Lock()
        self._stats: tuple[dict[str, int], int] = ({}, 0)
        self._stats_time = float("-inf")

    def _repository_stats(self) -> tuple[dict[str, int], int]:
        """``stats()`` and the snapshot count, cached: concurrent scrapes share one scan."""
        with self._lock:
            if time.monotonic() - self._stats_time >= self.stats_max_age:
                self._stats = (self.repo.stats(), len(self.repo.snapshot_ids()))
                self._stats_time = time.monotonic()
            return self._stats

    def collect(self) -> Iterator[Metric]:
        """Every repository metric, read now."""
        info = GaugeMetricFamily(
            "pysrbup_info", "The server's version and settings.", labels=("version", "append_only")
        )
        info.add_metric((__version__, str(self.repo.append_only).lower()), 1)
        yield info
        stats, snapshots = self._repository_stats()
        for key, name, text in _STATS_GAUGES:
            yield GaugeMetricFamily(name, text, value=stats[key])
        yield GaugeMetricFamily("pysrbup_snapshots", "Snapshot records stored.", value=snapshots)
        yield GaugeMetricFamily(
            "pysrbup_sessions_open", "Writing sessions open now.", value=self.repo.open_sessions
        )
        counters = self.repo.counters.snapshot()
        for key, name, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=counters[key])
        for key, name, text in _LAST_SCRUB_GAUGES:
            yield GaugeMetricFamily(name, text, value=counters[key])


Observe = Callable[[grpc.StatusCode, float], None]


def _timed_unary(behaviour: Callable, observe: Observe) -> Callable:
    def timed(request, context):
        start = time.perf_counter()
        try:
            reply = behaviour(request, context)
        except BaseException:  # context.abort raises; its code is in the context
            observe(context.code() or grpc.StatusCode.UNKNOWN, time.perf_counter() - start)
            raise
        observe(context.code() or grpc.StatusCode.OK, time.perf_counter() - start)
        return reply

    return timed


def _timed_stream(behaviour: Callable, observe: Observe) -> Callable:
    def timed(request, context):
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield from behaviour(request, context)
            code = context.code() or grpc.StatusCode.OK
        except GeneratorExit:  # gRPC dropped the stream: the client cancelled or went away
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            observe(code, time.perf_counter() - start)

    return timed


def _timed_handler(handler: grpc.RpcMethodHandler, observe: Observe) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour timed, same (de)serializers."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _timed_unary(handler.unary_unary, observe), **codecs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _timed_stream(handler.unary_stream, observe), **codecs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _timed_unary(handler.stream_unary, observe), **codecs
        )
    return grpc.stream_stream_rpc_method_handler(
        _timed_stream(handler.stream_stream, observe), **codecs
    )


class LatencyInterceptor(grpc.ServerInterceptor):
    """Times every RPC into a histogram labelled by method and status code.

    It sees the generic (raw-bytes) handlers too. Wrapped handlers are made
    once per method and reused; methods the server does not serve are not
    timed, so clients cannot add labels at will.
    """

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._timed: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _observer(self, method: str) -> Observe:
        children: dict[grpc.StatusCode, Histogram] = {}

        def observe(code: grpc.StatusCode, seconds: float) -> None:
            child = children.get(code)
            if child is None:
                child = children[code] = self._histogram.labels(method, code.name)
            child.observe(seconds)

        return observe

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._timed.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        timed = _timed_handler(handler, self._observer(method))
        self._timed[method] = (handler, timed)
        return timed


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (IPv6 hosts in brackets) as (host, port); a bare port is loopback's."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics-address takes [HOST:]PORT, not {text!r}")
    return host, int(port)


class ServerMetrics:
    """A server's metrics: their registry, the RPC interceptor, and the HTTP endpoint."""

    def __init__(self, repo: Repository, stats_max_age: float = STATS_MAX_AGE):
        self.registry = CollectorRegistry()
        self.registry.register(RepositoryCollector(repo, stats_max_age))
        ProcessCollector(registry=self.registry)  # the server's CPU time and memory
        latency = Histogram(
            "pysrbup_rpc_duration_seconds",
            "Time from an RPC's start to its end, by method and status code.",
            labelnames=("method", "code"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.interceptor = LatencyInterceptor(latency)
        self._httpd = None

    def start_http(self, host: str, port: int) -> str:
        """Serves ``/metrics`` on ``host:port`` in a thread; returns its URL (OSError if busy)."""
        self._httpd, _ = start_http_server(port, host, registry=self.registry)
        bound = self._httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}/metrics"

    def stop(self) -> None:
        """Stops the HTTP endpoint."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
